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
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from rayloop.errors import NotFoundError, RolloutError, RolloutInProgressError
from rayloop.registry.models import iso
from rayloop.registry.names import validate_name, validate_version

if TYPE_CHECKING:
    from rayloop.registry.sql import Database, Tx

END_STATUSES = ("succeeded", "rolled_back", "aborted", "failed")


def _rollout_dict(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(r["id"]),
        "name": r["name"],
        "from_version": None if r["from_version"] is None else int(r["from_version"]),
        "to_version": int(r["to_version"]),
        "strategy": r["strategy"],
        "plan": json.loads(r["plan"]),
        "state": json.loads(r["state"]),
        "history": json.loads(r["history"]),
        "status": r["status"],
        "owner": r["owner"],
        "started_at": iso(r["started_at"]),
        "updated_at": iso(r["updated_at"]),
        "ended_at": iso(r["ended_at"]),
        "active": bool(r["active"]),
    }


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
        self, name: str, *, from_version: int | None, to_version: int, strategy: str, plan: dict[str, Any], owner: str
    ) -> int:
        """Take the model's rollout lock and record the plan; return the rollout id.

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
        state: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
    ) -> None:
        """Set status and/or replace the state of an active rollout; append ``event`` (timestamped) to its history."""
        with self.db.transaction(write=True) as tx:
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
                    row["state"] if state is None else _json("state", state),
                    json.dumps(history),
                    now,
                    rid,
                ),
            )

    def end_rollout(self, rid: int, status: str) -> None:
        """Finish a rollout with one of :data:`END_STATUSES` and release the model's lock.

        Ending an already ended rollout with the same status is a no-op.
        """
        if status not in END_STATUSES:
            raise RolloutError(f"rollout end status {status!r} is not one of {', '.join(END_STATUSES)}")
        with self.db.transaction(write=True) as tx:
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

    def active_rollout(self, name: str) -> dict[str, Any] | None:
        validate_name(name)
        with self.db.transaction() as tx:
            row = tx.one("SELECT * FROM rl_rollouts WHERE name = ? AND active = 1", (name,))
        return None if row is None else _rollout_dict(row)

    def rollout(self, rid: int) -> dict[str, Any]:
        with self.db.transaction() as tx:
            row = tx.one("SELECT * FROM rl_rollouts WHERE id = ?", (rid,))
        if row is None:
            raise NotFoundError(f"rollout {rid} does not exist")
        return _rollout_dict(row)

    def rollouts(self, name: str) -> list[dict[str, Any]]:
        """All rollouts of ``name``, newest first."""
        validate_name(name)
        with self.db.transaction() as tx:
            rows = tx.all("SELECT * FROM rl_rollouts WHERE name = ? ORDER BY id DESC", (name,))
        return [_rollout_dict(r) for r in rows]


def _in_progress(row: dict[str, Any]) -> RolloutInProgressError:
    return RolloutInProgressError(
        f"rollout {row['id']} of {row['name']!r} (v{row['from_version']} -> v{row['to_version']}, {row['strategy']}, "
        f"owner {row['owner']}) is {row['status']} since {iso(row['started_at'])}"
    )
