"""The registry's tables, created on first use (same DDL on SQLite and PostgreSQL).

    rl_models       one row per model name; ``next_version`` is the counter that
                    makes versions monotonic and never reused, even after delete
    rl_versions     one row per version; ``status`` is pending -> ready, or
                    failed; a deleted version keeps its row (status deleted) so
                    lineage stays complete after its artifacts are gone
    rl_aliases      (name, alias) -> version
    rl_alias_log    every alias move: time, from, to, actor, reason
    rl_deployments  (name, app, slot) -> version, written by the rollout controller
    rl_rollouts     rollout bookkeeping; at most one active per model (unique
                    partial index), which is the rollout lock
    rl_leases       rollout id -> the controller that owns it: holder, fencing
                    token (bumped on every takeover), lease expiry
    rl_locks        named locks with a lease (the Serve-config lock): holder,
                    fencing token, expiry (see :mod:`rayloop.registry.locks`)

Times are UNIX seconds (DOUBLE PRECISION); JSON lives in TEXT columns.
"""

from __future__ import annotations

from rayloop.registry.sql import Database

SCHEMA_VERSION = 1
_ADVISORY_LOCK_KEY = 0x7261796C  # "rayl": serialises concurrent CREATE TABLE on PostgreSQL

_DDL = [
    """CREATE TABLE IF NOT EXISTS rl_models (
        name TEXT PRIMARY KEY,
        next_version BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS rl_versions (
        name TEXT NOT NULL REFERENCES rl_models(name),
        version BIGINT NOT NULL,
        status TEXT NOT NULL,
        fingerprint TEXT,
        manifest TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        created_by TEXT NOT NULL,
        parent BIGINT,
        metadata TEXT NOT NULL,
        lineage TEXT NOT NULL,
        annotations TEXT NOT NULL,
        uri TEXT NOT NULL,
        deleted_at DOUBLE PRECISION,
        PRIMARY KEY (name, version)
    )""",
    """CREATE TABLE IF NOT EXISTS rl_aliases (
        name TEXT NOT NULL REFERENCES rl_models(name),
        alias TEXT NOT NULL,
        version BIGINT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (name, alias)
    )""",
    """CREATE TABLE IF NOT EXISTS rl_alias_log (
        id {id},
        name TEXT NOT NULL,
        alias TEXT NOT NULL,
        from_version BIGINT,
        to_version BIGINT,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS rl_alias_log_name ON rl_alias_log (name, alias)",
    """CREATE TABLE IF NOT EXISTS rl_deployments (
        name TEXT NOT NULL REFERENCES rl_models(name),
        app TEXT NOT NULL,
        slot TEXT NOT NULL,
        version BIGINT NOT NULL,
        since DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (name, app, slot)
    )""",
    """CREATE TABLE IF NOT EXISTS rl_rollouts (
        id {id},
        name TEXT NOT NULL REFERENCES rl_models(name),
        from_version BIGINT,
        to_version BIGINT NOT NULL,
        strategy TEXT NOT NULL,
        plan TEXT NOT NULL,
        state TEXT NOT NULL,
        history TEXT NOT NULL,
        status TEXT NOT NULL,
        owner TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        active INTEGER NOT NULL
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS rl_rollouts_one_active ON rl_rollouts (name) WHERE active = 1",
    """CREATE TABLE IF NOT EXISTS rl_leases (
        rollout_id BIGINT PRIMARY KEY,
        holder TEXT NOT NULL,
        token BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS rl_locks (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        token BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS rl_schema (version BIGINT NOT NULL)",
]

_ID = {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT", "postgresql": "BIGSERIAL PRIMARY KEY"}


def ensure_schema(db: Database) -> None:
    """Create the tables if they are missing (idempotent, safe from many processes at once)."""
    with db.transaction(write=True) as tx:
        if tx.dialect == "postgresql":
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_LOCK_KEY,))
        for stmt in _DDL:
            tx.execute(stmt.replace("{id}", _ID[tx.dialect]))
        if tx.one("SELECT version FROM rl_schema") is None:
            tx.execute("INSERT INTO rl_schema (version) VALUES (?)", (SCHEMA_VERSION,))
