"""Sign-in for the web console: an API key once, then a signed session cookie.

A browser cannot send a ``Bearer`` header on page loads, so ``POST /login`` takes a key and answers with a
cookie ``KEYID.EXPIRES.SIGNATURE``: ``KEYID`` names the key (a prefix of its sha256), ``SIGNATURE`` is an
HMAC-SHA256 over the rest with the cluster's console secret (``secrets/console-key`` in storage, beside the
data, read by every console replica and no client). A cookie is valid until it expires and only while its
key is still accepted: removing a key signs its sessions out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

COOKIE = "rayloop_console"
SECRET_KEY = "secrets/console-key"
KEY_ID_CHARS = 16


def console_secret(storage: Any) -> bytes:
    """The console's signing key, created in ``storage`` on first use (a concurrent first writer may win: the
    stored one is what every replica uses)."""
    if not storage.exists(SECRET_KEY):
        storage.write_bytes(SECRET_KEY, secrets.token_hex(32).encode())
    data: bytes = storage.read_bytes(SECRET_KEY)
    return data


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def issue(secret: bytes, key_hash: str, ttl_s: float, now: float | None = None) -> str:
    """A cookie value for the key whose sha256 is ``key_hash``, valid for ``ttl_s`` seconds."""
    expires = int((time.time() if now is None else now) + ttl_s)
    payload = f"{key_hash[:KEY_ID_CHARS]}.{expires}"
    return f"{payload}.{_sign(secret, payload)}"


def verify(secret: bytes, cookie: str | None, key_hashes: set[str], now: float | None = None) -> bool:
    """Whether ``cookie`` is one :func:`issue` made, not expired, for a key still in ``key_hashes``."""
    if not cookie:
        return False
    parts = cookie.split(".")
    if len(parts) != 3:
        return False
    key_id, expires, signature = parts
    if not hmac.compare_digest(_sign(secret, f"{key_id}.{expires}"), signature):
        return False
    try:
        if int(expires) < (time.time() if now is None else now):
            return False
    except ValueError:
        return False
    return any(h[:KEY_ID_CHARS] == key_id for h in key_hashes)


def safe_next(target: str | None, prefix: str) -> str:
    """Where to go after signing in: a path under the console's own prefix, never another site."""
    home = prefix.rstrip("/") + "/"
    if not target or not target.startswith(home) or target.startswith("//") or "\\" in target:
        return home
    return target
