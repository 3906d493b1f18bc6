"""Rollout bookkeeping kept by the registry for the rollout controller.

At most one rollout per model is active at a time: that row is the model's
rollout lock (a unique partial index backs it up in the database). A
rollout's ``history`` is an append-only list of events, each stamped with
``time``. Result dicts carry::

    id, name, from_version, to_version, strategy, plan, state, history,
    status, owner, started_at, updated_at, ended_at, active

(times in ISO 8601 UTC; ``status`` is ``running`` or whatever
:meth:`RolloutBook.update_rollout` set, and finally one of
:data:`END_STATUSES`).

Ownership is a lease with a fencing token (``rl_leases``): the controller that
began a rollout holds token 1 and renews the lease while it runs; another
controller may take the rollout over only once the lease expired, which bumps
the token. Every write a controller makes passes its ``fence`` (rollout id,
token) and is refused with :class:`LeaseLostError` in the same transaction when
the token is no longer the current one, so a controller that wakes from a pause
stops instead of writing over its successor.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from rayloop.errors import LeaseLostError, NotFoundError, RolloutError, RolloutInProgressError
from rayloop.registry.models import iso
from rayloop.registry.names import validate_name, validate_version

if TYPE_CHECKING:
    from rayloop.registry.sql import Database, Tx

DEFAULT_LEASE_S = 30.0

Fence = tuple[int, int]
"""(rollout id, fencing token) of the controller making a write."""


def check_fence(tx: Tx, fence: Fence | None) -> None:
    """Refuse the write in ``tx`` unless ``fence``'s token is the rollout's current one (None: not a controller)."""
    if fence is None:
        return
    rid, token = fence
    row = tx.lock_row("rl_leases", "rollout_id = ?", (rid,))
    if row is None or int(row["token"]) != token:
        now_held = "nobody" if row is None else f"{row['holder']} (token {row['token']})"
        raise LeaseLostError(f"rollout {rid} is no longer ours (token {token}): it is held by {now_held}")


class Phase(StrEnum):
    """Where an active rollout is; written before the controller acts on it, so a successor knows."""

    PLANNED = "planned"
    STARTING = "starting"  # the new version's slot is being deployed
    STEP = "step"  # canary: a share of the traffic on the new version
    ROLLING = "rolling"  # rolling: the stable slot swaps in place
    SWITCHED = "switched"  # blue-green: green takes all traffic, blue held
    MIRRORING = "mirroring"  # shadow: copies of requests go to the new version
    RELEASING = "releasing"  # shadow: the shadow slot is being released
    HOLDING = "holding"  # paused by an operator or waiting for samples
    PROMOTING = "promoting"  # the new version becomes stable (forward on a reconcile)
    ROLLING_BACK = "rolling_back"
    DONE = "done"


class RolloutStatus(StrEnum):
    """How a rollout ended (:data:`END_STATUSES`); while it runs, its status is its phase."""

    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FAILED = "failed"


END_STATUSES: tuple[str, ...] = tuple(RolloutStatus)


class RolloutState(BaseModel):
    """The resumable state of a rollout, kept with it in the registry.

    Unknown keys are kept (written by another rayloop version), never dropped.
    """

    model_config = ConfigDict(extra="allow")

    phase: Phase = Phase.PLANNED
    reason: str | None = Field(default=None, description="Why the rollout is in this phase (a verdict, a command).")
    step: int | None = Field(default=None, description="Canary: index of the current step.")
    percent: float | None = Field(default=None, description="Canary: traffic share of the current step.")
    started: float | None = Field(default=None, description="UNIX time the controller began.")
    from_cfg: dict[str, Any] | None = Field(default=None, description="The stable version's model config before.")
    to_cfg: dict[str, Any] | None = Field(default=None, description="The new version's model config.")
    aliases_before: dict[str, int | None] = Field(
        default_factory=dict, description="Aliases the rollout moves, as they were (restored on a rollback)."
    )
    desired: dict[str, Any] | None = Field(default=None, description="The app layout the controller applies.")
    report: dict[str, Any] | None = Field(default=None, description="Shadow: the comparison report.")

    def updated(self, **changes: Any) -> RolloutState:
        """A copy with ``changes`` applied (validated)."""
        return RolloutState.model_validate({**self.model_dump(exclude_unset=True), **changes})

    def to_json(self) -> dict[str, Any]:
        """As stored and printed: only what was set."""
        return self.model_dump(mode="json", exclude_unset=True)


class Lease(BaseModel):
    """Who holds an active rollout, with which fencing token, until when (UNIX seconds)."""

    holder: str
    token: int
    expires_at: float


class RolloutRecord(BaseModel):
    """One rollout as the registry keeps it; ``history`` is its timeline of events, each with ``time``."""

    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    from_version: int | None
    to_version: int
    strategy: str
    plan: dict[str, Any]
    state: RolloutState
    history: list[dict[str, Any]]
    status: str = Field(description="The phase while active; then one of END_STATUSES.")
    owner: str | None
    started_at: str | None
    updated_at: str | None
    ended_at: str | None
    active: bool

    def to_json(self) -> dict[str, Any]:
        """The record as JSON (what ``--json`` prints)."""
        return {**self.model_dump(mode="json"), "state": self.state.to_json()}


def _rollout_record(r: dict[str, Any]) -> RolloutRecord:
    return RolloutRecord(
        id=int(r["id"]),
        name=r["name"],
        from_version=None if r["from_version"] is None else int(r["from_version"]),
        to_version=int(r["to_version"]),
        strategy=r["strategy"],
        plan=json.loads(r["plan"]),
        state=RolloutState.model_validate(json.loads(r["state"])),
        history=json.loads(r["history"]),
        status=r["status"],
        owner=r["owner"],
        started_at=iso(r["started_at"]),
        updated_at=iso(r["updated_at"]),
        ended_at=iso(r["ended_at"]),
        active=bool(r["active"]),
    )


def _json(kind: str, value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RolloutError(f"rollout {kind} is not JSON-serialisable: {e}") from None


class RolloutBook:
    """Mixed into :class:`~rayloop.registry.Registry`; needs ``self.db`` and the version checks."""

    db: Database

    def _lock_model(self, tx: Tx, name: str) -> None:  # implemented by Registry
        raise NotImplementedError

    def _ready_row(self, tx: Tx, name: str, version: int, *, allow_deleted: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    def begin_rollout(
        self,
        name: str,
        *,
        from_version: int | None,
        to_version: int,
        strategy: str,
        plan: dict[str, Any],
        owner: str,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> int:
        """Take the model's rollout lock and record the plan; return the rollout id. ``owner`` holds its lease
        (fencing token 1) for ``lease_s`` seconds.

        Raises :class:`RolloutInProgressError` if another rollout of ``name`` is active.
        """
        validate_name(name)
        validate_version(to_version)
        if not isinstance(strategy, str) or not strategy:
            raise RolloutError(f"rollout strategy must be a non-empty string, got {strategy!r}")
        plan_json = _json("plan", plan)
        now = time.time()
        try:
            with self.db.transaction(write=True) as tx:
                self._lock_model(tx, name)
                self._ready_row(tx, name, to_version)
                if from_version is not None:
                    self._ready_row(tx, name, validate_version(from_version), allow_deleted=True)
                active = tx.one("SELECT * FROM rl_rollouts WHERE name = ? AND active = 1", (name,))
                if active is not None:
                    raise _in_progress(active)
                row = tx.one(
                    "INSERT INTO rl_rollouts (name, from_version, to_version, strategy, plan, state, history, status,"
                    " owner, started_at, updated_at, ended_at, active)"
                    " VALUES (?, ?, ?, ?, ?, '{}', ?, 'running', ?, ?, ?, NULL, 1)"
                    " RETURNING id",
                    (
                        name,
                        from_version,
                        to_version,
                        strategy,
                        plan_json,
                        json.dumps([{"time": iso(now), "event": "begin", "owner": owner}]),
                        owner,
                        now,
                        now,
                    ),
                )
                assert row is not None
                tx.execute(
                    "INSERT INTO rl_leases (rollout_id, holder, token, expires_at) VALUES (?, ?, 1, ?)",
                    (int(row["id"]), owner, now + lease_s),
                )
                return int(row["id"])
        except RolloutInProgressError:
            raise
        except Exception as e:
            if self.db.is_unique_violation(e):  # the index caught a race the lock did not
                raise RolloutInProgressError(f"another rollout of {name!r} started at the same time") from None
            raise

    def _active_row(self, tx: Tx, rid: int) -> dict[str, Any]:
        row = tx.lock_row("rl_rollouts", "id = ?", (rid,))
        if row is None:
            raise NotFoundError(f"rollout {rid} does not exist")
        return row

    def update_rollout(
        self,
        rid: int,
        *,
        status: str | None = None,
        state: RolloutState | None = None,
        event: dict[str, Any] | None = None,
        fence: Fence | None = None,
    ) -> None:
        """Set status and/or replace the state of an active rollout; append ``event`` (timestamped) to its history."""
        with self.db.transaction(write=True) as tx:
            check_fence(tx, fence)
            row = self._active_row(tx, rid)
            if not row["active"]:
                raise RolloutError(f"rollout {rid} already ended ({row['status']}); it cannot be updated")
            if status is not None and status in END_STATUSES:
                raise RolloutError(f"status {status!r} ends a rollout: call end_rollout({rid}, {status!r})")
            now = time.time()
            history = json.loads(row["history"])
            if event is not None:
                history.append({"time": iso(now), **json.loads(_json("event", event))})
            tx.execute(
                "UPDATE rl_rollouts SET status = ?, state = ?, history = ?, updated_at = ? WHERE id = ?",
                (
                    status or row["status"],
                    row["state"] if state is None else _json("state", state.to_json()),
                    json.dumps(history),
                    now,
                    rid,
                ),
            )

    def end_rollout(self, rid: int, status: str, *, fence: Fence | None = None) -> None:
        """Finish a rollout with one of :data:`END_STATUSES` and release the model's lock.

        Ending an already ended rollout with the same status is a no-op.
        """
        if status not in END_STATUSES:
            raise RolloutError(f"rollout end status {status!r} is not one of {', '.join(END_STATUSES)}")
        with self.db.transaction(write=True) as tx:
            check_fence(tx, fence)
            row = self._active_row(tx, rid)
            if not row["active"]:
                if row["status"] == status:
                    return
                raise RolloutError(f"rollout {rid} already ended ({row['status']})")
            now = time.time()
            history = [*json.loads(row["history"]), {"time": iso(now), "event": "end", "status": status}]
            tx.execute(
                "UPDATE rl_rollouts SET status = ?, active = 0, ended_at = ?, updated_at = ?, history = ? WHERE id = ?",
                (status, now, now, json.dumps(history), rid),
            )

    # -- leases ----------------------------------------------------------------
    def lease(self, rid: int) -> Lease | None:
        """A rollout's lease; None for one without (older rows)."""
        with self.db.transaction() as tx:
            row = tx.one("SELECT holder, token, expires_at FROM rl_leases WHERE rollout_id = ?", (rid,))
        if row is None:
            return None
        return Lease(holder=row["holder"], token=int(row["token"]), expires_at=float(row["expires_at"]))

    def renew_lease(self, rid: int, token: int, lease_s: float = DEFAULT_LEASE_S) -> float:
        """Extend the lease of the holder of ``token`` by ``lease_s``; return the new expiry.

        Raises :class:`LeaseLostError` when another controller took the rollout over.
        """
        with self.db.transaction(write=True) as tx:
            check_fence(tx, (rid, token))
            expires = time.time() + lease_s
            tx.execute("UPDATE rl_leases SET expires_at = ? WHERE rollout_id = ?", (expires, rid))
        return expires

    def take_lease(self, rid: int, holder: str, lease_s: float = DEFAULT_LEASE_S, *, force: bool = False) -> int:
        """Take an active rollout over: a new fencing token for ``holder``. Only once its lease expired (or
        ``force``: its holder is known to be dead); else :class:`RolloutInProgressError`."""
        with self.db.transaction(write=True) as tx:
            row = self._active_row(tx, rid)
            if not row["active"]:
                raise RolloutError(f"rollout {rid} already ended ({row['status']}); there is nothing to take over")
            lease = tx.lock_row("rl_leases", "rollout_id = ?", (rid,))
            now = time.time()
            if lease is not None and float(lease["expires_at"]) > now and not force:
                raise RolloutInProgressError(
                    f"rollout {rid} is held by {lease['holder']} for {float(lease['expires_at']) - now:.0f}s more"
                )
            token = 1 if lease is None else int(lease["token"]) + 1
            if lease is None:
                tx.execute(
                    "INSERT INTO rl_leases (rollout_id, holder, token, expires_at) VALUES (?, ?, ?, ?)",
                    (rid, holder, token, now + lease_s),
                )
            else:
                tx.execute(
                    "UPDATE rl_leases SET holder = ?, token = ?, expires_at = ? WHERE rollout_id = ?",
                    (holder, token, now + lease_s, rid),
                )
            tx.execute("UPDATE rl_rollouts SET owner = ?, updated_at = ? WHERE id = ?", (holder, now, rid))
        return token

    def active_rollout(self, name: str) -> RolloutRecord | None:
        validate_name(name)
        with self.db.transaction() as tx:
            row = tx.one("SELECT * FROM rl_rollouts WHERE name = ? AND active = 1", (name,))
        return None if row is None else _rollout_record(row)

    def rollout(self, rid: int) -> RolloutRecord:
        with self.db.transaction() as tx:
            row = tx.one("SELECT * FROM rl_rollouts WHERE id = ?", (rid,))
        if row is None:
            raise NotFoundError(f"rollout {rid} does not exist")
        return _rollout_record(row)

    def rollouts(self, name: str) -> list[RolloutRecord]:
        """All rollouts of ``name``, newest first."""
        validate_name(name)
        with self.db.transaction() as tx:
            rows = tx.all("SELECT * FROM rl_rollouts WHERE name = ? ORDER BY id DESC", (name,))
        return [_rollout_record(r) for r in rows]


def _in_progress(row: dict[str, Any]) -> RolloutInProgressError:
    return RolloutInProgressError(
        f"rollout {row['id']} of {row['name']!r} (v{row['from_version']} -> v{row['to_version']}, {row['strategy']}, "
        f"owner {row['owner']}) is {row['status']} since {iso(row['started_at'])}"
    )
