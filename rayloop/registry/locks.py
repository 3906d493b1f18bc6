"""Named locks with a lease and a fencing token, kept in the registry database (``rl_locks``).

A lock held as an open transaction (SQLite's write lock, a PostgreSQL advisory lock) stays held for as
long as its process is frozen: a controller stopped by SIGSTOP, a long GC pause or a suspended VM would
block every writer of the registry, including the controller that should take over. A lease lock is a
row instead: taking, renewing and releasing it are each one short transaction; a thread renews it while
it is held; it expires ``ttl_s`` after the last renewal, so a frozen holder loses it; and every take
bumps its token, so the holder can check, right before it acts, that nobody took it over meanwhile
(:meth:`HeldLock.check`).

    >>> import tempfile, os
    >>> from rayloop.registry.sql import Database
    >>> from rayloop.registry.tables import ensure_schema
    >>> db = Database("sqlite:///" + os.path.join(tempfile.mkdtemp(), "x.db")); ensure_schema(db)
    >>> with lease_lock(db, "serve-config", ttl_s=5) as held:
    ...     held.check(); held.token
    1
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rayloop.errors import ClusterError, LeaseLostError
from rayloop.registry.sql import Database


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class HeldLock:
    """A lock this process holds: renewed from a thread until :meth:`release`; ``check`` before acting."""

    def __init__(self, db: Database, name: str, holder: str, token: int, ttl_s: float) -> None:
        self.db, self.name, self.holder, self.token, self.ttl_s = db, name, holder, token, ttl_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"rayloop-lock-{name}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._renew()
            except LeaseLostError as e:
                self.lost = str(e)
                return
            except Exception:
                pass  # the database is unreachable for a moment; the next try may work, expiry is the bound

    def _renew(self) -> None:
        now = time.time()
        with self.db.transaction(write=True) as tx:
            changed = tx.execute(
                "UPDATE rl_locks SET expires_at = ? WHERE name = ? AND token = ? AND expires_at > ?",
                (now + self.ttl_s, self.name, self.token, now),
            )
        if changed != 1:
            raise LeaseLostError(
                f"lock {self.name!r} is no longer ours (token {self.token}): it expired or was taken over"
            )

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this holder still owns the lock (its token, not expired)."""
        if self.lost is not None:
            raise LeaseLostError(self.lost)
        with self.db.transaction() as tx:
            row = tx.one("SELECT holder, token, expires_at FROM rl_locks WHERE name = ?", (self.name,))
        if row is None or int(row["token"]) != self.token or float(row["expires_at"]) <= time.time():
            now_held = "nobody" if row is None else f"{row['holder']} (token {row['token']})"
            raise LeaseLostError(
                f"lock {self.name!r} is no longer ours (token {self.token}, lease {self.ttl_s:g}s): held by {now_held}"
            )

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with self.db.transaction(write=True) as tx:
                # The row stays (expired) so the next take bumps the token: a token is never handed out twice.
                tx.execute("UPDATE rl_locks SET expires_at = 0 WHERE name = ? AND token = ?", (self.name, self.token))
        except Exception:
            pass  # the row expires on its own


def try_acquire(db: Database, name: str, holder: str, ttl_s: float) -> tuple[int | None, dict[str, object] | None]:
    """One attempt: ``(token, None)`` when taken, ``(None, current row)`` when another holder has it."""
    now = time.time()
    with db.transaction(write=True) as tx:
        # The row exists before it is locked: PostgreSQL's FOR UPDATE cannot lock a row that is not there,
        # so two first takers would both insert (one failing on the key) without this.
        tx.execute(
            "INSERT INTO rl_locks (name, holder, token, expires_at) VALUES (?, ?, 0, 0) ON CONFLICT (name) DO NOTHING",
            (name, holder),
        )
        row = tx.lock_row("rl_locks", "name = ?", (name,))
        assert row is not None
        if float(row["expires_at"]) > now:
            return None, row
        token = int(row["token"]) + 1
        tx.execute(
            "UPDATE rl_locks SET holder = ?, token = ?, expires_at = ? WHERE name = ?",
            (holder, token, now + ttl_s, name),
        )
        return token, None


@contextmanager
def lease_lock(
    db: Database,
    name: str,
    *,
    ttl_s: float = 30.0,
    wait_s: float = 120.0,
    holder: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[HeldLock]:
    """Hold lock ``name`` for the block (waiting up to ``wait_s`` for it); renewed every ``ttl_s / 3``.

    Raises :class:`~rayloop.errors.ClusterError` when another holder keeps it longer than ``wait_s``.
    The table is the registry's (``ensure_schema`` creates it).
    """
    holder = holder or default_holder()
    deadline = time.time() + wait_s
    pause = 0.05
    while True:
        token, row = try_acquire(db, name, holder, ttl_s)
        if token is not None:
            break
        if time.time() >= deadline:
            assert row is not None
            left = float(row["expires_at"]) - time.time()  # type: ignore[arg-type]
            raise ClusterError(
                f"lock {name!r} is held by {row['holder']} (for {left:.0f}s more unless renewed); waited {wait_s:g}s",
                hint="Another rayloop command is changing the same thing; retry when it is done "
                "(a holder that died releases the lock when its lease ends).",
            )
        sleep(pause)
        pause = min(pause * 2, 0.5)
    held = HeldLock(db, name, holder, token, ttl_s)
    try:
        yield held
    finally:
        held.release()
