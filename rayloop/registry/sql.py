"""One small SQL layer over SQLite (stdlib) and PostgreSQL (psycopg 3).

Statements are written once with ``?`` placeholders; for PostgreSQL they are
rewritten to ``%s``. Rows come back as dicts. Writes run in a transaction that
serialises writers the way each engine does it best:

- SQLite: WAL mode (readers never block the writer), a busy timeout, and
  ``BEGIN IMMEDIATE`` so the write lock is taken up front; a deferred
  transaction that upgrades to a writer can fail with "database is locked"
  even with a busy timeout, which is how concurrent processes lose rows.
- PostgreSQL: READ COMMITTED plus explicit row locks (``SELECT ... FOR
  UPDATE``, see :meth:`Tx.lock_row`) taken by the caller.

Connections are per thread and per process (a connection inherited through
``fork`` is never reused), so one :class:`Database` can be shared by threads.

    >>> import tempfile, os
    >>> db = Database("sqlite:///" + os.path.join(tempfile.mkdtemp(), "x.db"))
    >>> with db.transaction(write=True) as tx:
    ...     _ = tx.execute("CREATE TABLE t (a BIGINT)")
    ...     _ = tx.execute("INSERT INTO t VALUES (?)", (1,))
    >>> with db.transaction() as tx:
    ...     tx.one("SELECT a FROM t")
    {'a': 1}
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from rayloop.errors import ConfigError, RegistryError

Dialect = Literal["sqlite", "postgresql"]


class Tx:
    """An open transaction: run statements, get dict rows."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cur = cursor
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return the number of rows it changed."""
        self._cur.execute(self._sql(sql), tuple(params))
        return int(self._cur.rowcount)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self._cur.execute(self._sql(sql), tuple(params))
        rows = self._cur.fetchall()
        if self.dialect == "sqlite":
            return [dict(r) for r in rows]
        return list(rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def lock_row(self, table: str, where: str, params: Sequence[Any]) -> dict[str, Any] | None:
        """Read one row and hold it until commit (``FOR UPDATE`` on PostgreSQL).

        SQLite needs no row lock: ``BEGIN IMMEDIATE`` already holds the
        database-wide write lock for the whole transaction.
        """
        suffix = " FOR UPDATE" if self.dialect == "postgresql" else ""
        return self.one(f"SELECT * FROM {table} WHERE {where}{suffix}", params)


def _sqlite_path(url: str) -> str:
    path = url[len("sqlite:///") :]
    if not path or path == ":memory:":
        raise ConfigError(
            f"registry url {url!r} names no file; an in-memory database cannot be shared between processes",
            hint="Use sqlite:///path/to/registry.db",
        )
    return path


class Database:
    """A SQLite file or a PostgreSQL server, reached through :meth:`transaction`."""

    def __init__(self, url: str, *, busy_timeout_s: float = 60.0) -> None:
        self.url = url
        self.busy_timeout_s = busy_timeout_s
        if url.startswith("sqlite:///"):
            self.dialect: Dialect = "sqlite"
            self._path = _sqlite_path(url)
            Path(self._path).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        elif url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
            self._path = ""
        else:
            raise ConfigError(
                f"registry url {url!r} is not supported",
                hint="Use sqlite:///path/to/registry.db or postgresql://user@host/db",
            )
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        # Connections do not travel (Ray tasks, spawn): the copy reconnects.
        state = self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # -- connections -------------------------------------------------------
    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            conn = sqlite3.connect(
                os.path.expanduser(self._path),
                timeout=self.busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            return conn
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:  # pragma: no cover - psycopg is an optional extra
            raise ConfigError(
                "the registry url points at PostgreSQL but psycopg is not installed",
                hint="pip install 'rayloop[postgres]'",
            ) from None
        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except psycopg.OperationalError as e:
            raise RegistryError(
                f"cannot connect to the registry database {_redact(self.url)}: {str(e).strip()}",
                hint="Check that PostgreSQL is running and the url (host, port, user, database) is right.",
            ) from None

    def _conn(self) -> Any:
        pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == pid and not _is_broken(conn, self.dialect):
            return conn
        conn = self._connect()
        self._local.conn, self._local.pid = conn, pid
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Tx]:
        """Run statements atomically; ``write=True`` takes the write lock up front on SQLite."""
        conn = self._conn()
        if self.dialect == "sqlite":
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(cur, "sqlite")
            except BaseException:
                conn.rollback()
                raise
            else:
                conn.commit()
            finally:
                cur.close()
        else:
            with conn.transaction(), conn.cursor() as cur:
                yield Tx(cur, "postgresql")

    def is_unique_violation(self, exc: BaseException) -> bool:
        if self.dialect == "sqlite":
            return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)
        try:
            import psycopg.errors
        except ImportError:  # pragma: no cover
            return False
        return isinstance(exc, psycopg.errors.UniqueViolation)


def _is_broken(conn: Any, dialect: Dialect) -> bool:
    if dialect == "sqlite":
        return False
    return bool(conn.closed or conn.broken)


def _redact(url: str) -> str:
    """Hide a password in ``scheme://user:password@host``."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
