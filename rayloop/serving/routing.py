"""Routing decisions of the serving app's ingress: pure functions, no Ray, no I/O.

The stable slot's replicas answer HTTP and route: each holds a :class:`RouteTable`
(under ``routes`` in the stable deployment's Serve ``user_config``) and asks
:class:`Picker` which slot answers each request:

- **Weighted**: ``canary_percent`` of the traffic goes to the ``canary`` slot
  (which is also the *green* slot of a blue-green switch), the rest to ``stable``.
- **Sticky**: a request with a session key (``x-rayloop-session-id`` or
  ``x-rayloop-session`` header, ``x-rayloop-user-id`` header, or the OpenAI
  ``user`` field) is hashed with the rollout's ``salt`` and the cluster's
  secret key (:func:`routing_secret`, kept in storage, never in a Serve
  config, so a client cannot compute or choose its bucket) into a bucket in
  ``[0, 100)``; it goes to canary iff its bucket is below ``canary_percent``.
  The bucket of a session never changes during a rollout (the salt is the
  rollout id), so raising the percentage only moves sessions from stable to
  canary, never back, and a session never flips while the percentage holds.
  The canary share then counts sessions, not requests.
- **Shadow**: ``shadow_percent`` of the answered requests are copied to the
  ``shadow`` slot after the primary answered (sampled by request id, so the
  choice is reproducible).

    >>> t = RouteTable(canary_percent=25, salt="rollout-7")
    >>> p = Picker(t)
    >>> p.pick("session-42") == p.pick("session-42")
    True
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

STABLE = "stable"
CANARY = "canary"
SHADOW = "shadow"
SLOTS: tuple[str, ...] = (STABLE, CANARY, SHADOW)
"""Version slots of the serving app; ``canary`` doubles as blue-green's *green*."""

USER_SLOTS: tuple[str, ...] = (STABLE, CANARY)
"""The slots whose answers reach users (shadow's never do)."""

SESSION_HEADERS: tuple[str, ...] = ("x-rayloop-session-id", "x-rayloop-session", "x-rayloop-user-id")


class RouteTable(BaseModel):
    """What the ingress does with traffic (``routes`` in the stable deployment's ``user_config``).

    Changing it through Serve's declarative path reconfigures the stable
    replicas in place: no restart, no dropped request.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    canary_percent: float = Field(
        default=0.0, ge=0, le=100, description="Share of traffic (sessions) on the canary slot."
    )
    sticky: bool = Field(default=True, description="Keep a session on one slot for the whole rollout.")
    salt: str = Field(
        default="",
        max_length=200,
        description="Sticky hash salt, fixed for a whole rollout (public: buckets also depend on the secret key).",
    )
    shadow_percent: float = Field(
        default=0.0, ge=0, le=100, description="Share of answered requests mirrored to shadow."
    )
    versions: dict[str, int] = Field(
        default_factory=dict, description="slot -> version it serves (for status and metrics; informational)."
    )
    rollout_id: int | None = Field(default=None, description="Registry rollout this table belongs to, if any.")
    observe: bool = Field(
        default=False,
        description="Send per-request observations to the app's stats actor (on while a rollout judges live "
        "traffic; off in the lean layout, so plain serving pays nothing for it).",
    )
    epoch: int = Field(default=0, ge=0, description="Bumped on every change, so callers can tell it was applied.")


SECRET_KEY = "secrets/routing-key"


def bucket(key: str, salt: str, secret: bytes = b"") -> float:
    """Stable position of ``key`` in ``[0, 100)`` for this ``salt`` and ``secret`` (a keyed hash: uniform,
    independent of Python's hash seed, and unknowable without the secret)."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8, key=secret[:64]).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0


def routing_secret(storage: Any) -> bytes:
    """The cluster's key for session buckets, created in ``storage`` on first use.

    It lives beside the data (``secrets/routing-key``), which every replica can read and no client can;
    it never appears in a Serve config, a log or the dashboard. The controllers create it before they
    deploy, so replicas starting together read one key.
    """
    import secrets

    if storage.exists(SECRET_KEY):
        data: bytes = storage.read_bytes(SECRET_KEY)
        return data
    storage.write_bytes(SECRET_KEY, secrets.token_hex(32).encode())
    out: bytes = storage.read_bytes(SECRET_KEY)  # a concurrent first writer may have won: use what is stored
    return out


def session_key(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    """The sticky key of a request: session header, user header, or the OpenAI ``user`` field."""
    for h in SESSION_HEADERS:
        v = headers.get(h)
        if v:
            return f"{h}:{v}"
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    return None


class Picker:
    """Applies a :class:`RouteTable`; ``rng`` draws for requests without a session key."""

    def __init__(self, table: RouteTable, rng: random.Random | None = None, secret: bytes = b"") -> None:
        self.table = table
        self.rng = rng or random.Random()
        self.secret = secret

    def pick(self, key: str | None) -> str:
        """``stable`` or ``canary`` for a request with sticky key ``key`` (None: no session)."""
        p = self.table.canary_percent
        if p <= 0:
            return STABLE
        if p >= 100:
            return CANARY
        if key is not None and self.table.sticky:
            x = bucket(key, self.table.salt, self.secret)
        else:
            x = self.rng.random() * 100.0
        return CANARY if x < p else STABLE

    def mirror(self, request_id: str) -> bool:
        """Whether this answered request is copied to the shadow slot."""
        p = self.table.shadow_percent
        if p <= 0:
            return False
        if p >= 100:
            return True
        return bucket(request_id, "shadow:" + self.table.salt, self.secret) < p


def slot_for_version(served: Mapping[str, int], version: int) -> str | None:
    """The user-facing slot serving ``version`` (stable first), or None: what a ``NAME@N`` request pins to."""
    return next((slot for slot in USER_SLOTS if served.get(slot) == version), None)
