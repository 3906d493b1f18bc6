"""Optional bearer API keys.

Keys come from the env var named by ``settings.serving.api_keys_env``
(comma-separated), from ``settings.serving.api_keys_file`` (one per line, ``#``
comments), or as sha256 hashes in the app's args (what ``rayloop serve`` passes,
so plain keys never appear in a Serve config). Only hashes are kept in memory
and keys are never logged. No keys configured means no authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from rayloop.config import ServingSettings
from rayloop.errors import ConfigError


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_hashes(serving: ServingSettings, env: dict[str, str] | None = None) -> set[str]:
    """sha256 hashes of the keys configured through the env var and the keys file."""
    env = dict(os.environ) if env is None else env
    keys = [k.strip() for k in env.get(serving.api_keys_env, "").split(",") if k.strip()]
    if serving.api_keys_file:
        p = Path(serving.api_keys_file).expanduser()
        if not p.is_file():
            raise ConfigError(
                f"serving.api_keys_file {str(p)!r} does not exist",
                hint="Create it (one key per line) or unset the setting.",
            )
        keys += [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return {hash_key(k) for k in keys}


class KeyChecker:
    """Checks ``Authorization: Bearer <key>`` against the configured hashes (constant time)."""

    def __init__(self, hashes: set[str]) -> None:
        self._hashes = sorted(hashes)

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def allows(self, authorization: str | None) -> bool:
        if not self._hashes:
            return True
        if not authorization or not authorization.lower().startswith("bearer "):
            return False
        got = hash_key(authorization[7:].strip())
        ok = False
        for h in self._hashes:  # no early exit: timing does not say which key matched
            ok |= hmac.compare_digest(got, h)
        return ok
