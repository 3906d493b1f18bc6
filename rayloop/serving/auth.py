"""Optional bearer API keys.

Keys come from the env var named by ``settings.serving.api_keys_env``
(comma-separated), from ``settings.serving.api_keys_file`` (one per line, ``#``
comments), or as sha256 hashes in the app's args (what ``rayloop serve`` passes,
so plain keys never appear in a Serve config). Only hashes are kept in memory
and keys are never logged.

Closed by default: with no key configured the API starts only on a loopback
address (a developer's own machine). Anywhere else it refuses to start unless
``serving.auth: none`` says so explicitly (:func:`check_auth_policy`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from pathlib import Path

from rayloop.config import ServingSettings
from rayloop.errors import ConfigError

logger = logging.getLogger("ray.serve")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_auth_policy(serving: ServingSettings, hashes: set[str] | list[str]) -> None:
    """Refuse an open API beyond loopback: raise :class:`ConfigError` unless keys exist or auth is ``none``."""
    if hashes or is_loopback(serving.http_host):
        return
    if serving.auth == "none":
        logger.warning(
            "rayloop API on %s without authentication (serving.auth: none): anyone who reaches it may use it",
            serving.http_host,
        )
        return
    raise ConfigError(
        f"no API key is configured and serving.http_host is {serving.http_host!r}, which other machines can "
        "reach: rayloop will not serve an open API there",
        hint=f"Set keys in ${serving.api_keys_env} (comma-separated) or serving.api_keys_file, bind "
        "serving.http_host to 127.0.0.1, or set serving.auth: none to run without authentication on purpose.",
    )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_hashes(
    serving: ServingSettings, env: dict[str, str] | None = None, *, keys_env: str | None = None
) -> set[str]:
    """sha256 hashes of the keys configured through the env var and the keys file (``keys_env``: only that
    env var's keys, e.g. the no-capture keys)."""
    env = dict(os.environ) if env is None else env
    keys = [k.strip() for k in env.get(keys_env or serving.api_keys_env, "").split(",") if k.strip()]
    if keys_env is None and serving.api_keys_file:
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

    @property
    def hashes(self) -> set[str]:
        return set(self._hashes)

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
