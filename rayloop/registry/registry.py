"""The model registry: immutable, content-addressed versions with aliases and lineage.

Artifacts live in storage under ``models/<name>/<version>/`` (any pyarrow.fs
URI); what exists, aliases, audit log, deployments and rollouts live in SQL
(SQLite or PostgreSQL).

Example::

    >>> from rayloop.registry import Registry
    >>> reg = Registry("/tmp/rl/storage", "sqlite:////tmp/rl/registry.db")  # doctest: +SKIP
    >>> mv = reg.register("demo", "/path/to/hf-model", lineage={"snapshot_id": "s1"})  # doctest: +SKIP
    >>> reg.set_alias("demo", "production", mv.version, expect=ABSENT)  # doctest: +SKIP
    >>> path = reg.fetch("demo")  # demo@production, verified, cached  # doctest: +SKIP

Register writes a ``pending`` row first (which allocates the version number),
uploads and hashes the files, writes ``manifest.json``, and only then flips
the row to ``ready``: a crash or failed upload never leaves a visible half
version, and the number it took is never handed out again.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rayloop.config import NODE_DIR_ENV, Settings
from rayloop.errors import AliasConflictError, IntegrityError, InUseError, NotFoundError, RegistryError
from rayloop.registry import artifacts
from rayloop.registry.models import Lineage, ModelVersion, iso, ts
from rayloop.registry.names import LATEST, Ref, parse_ref, validate_alias, validate_key, validate_name, validate_version
from rayloop.registry.rollouts import Fence, RolloutBook, check_fence
from rayloop.registry.sql import Database, Tx
from rayloop.registry.tables import ensure_schema
from rayloop.storage import Storage

ABSENT = 0
"""``expect=ABSENT`` in :meth:`Registry.set_alias`: the alias must not exist yet (versions start at 1)."""

PENDING_TIMEOUT_S = 24 * 3600.0
"""gc treats a registration still pending after this long as crashed."""


def _dumps(kind: str, value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RegistryError(
            f"{kind} is not JSON-serialisable: {e}", hint="Use dicts, lists, strings, numbers, bools."
        ) from None


def _as_dict(kind: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RegistryError(f"{kind} must be a dict, got {type(value).__name__}")
    return dict(value)


PASSWORD_KEY = "secrets/registry-password"  # where a Serve app's replicas find the registry's password


def database_url(settings: Settings) -> str:
    """The registry database's URL; when it has no password and ``registry.password_key`` is set, the password
    kept in storage under that key (how rayloop's Serve apps reach a PostgreSQL registry without the password
    in their arguments)."""
    from rayloop.config import url_password, with_password

    url = settings.registry_url
    key = settings.registry.password_key
    if key and url_password(url) is None:
        storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
        url = with_password(url, storage.read_bytes(key).decode().strip())
    return url


def without_password(settings: Settings) -> Settings:
    """``settings`` with the registry password moved out of the URL into storage (``PASSWORD_KEY``), for
    settings that travel where others can read them (a Serve app's arguments are shown in the dashboard)."""
    from rayloop.config import url_password, with_password

    url = settings.registry_url
    password = url_password(url)
    if password is None:
        return settings
    storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
    if not storage.exists(PASSWORD_KEY) or storage.read_bytes(PASSWORD_KEY).decode().strip() != password:
        storage.write_bytes(PASSWORD_KEY, password.encode())
        if storage.is_local:
            os.chmod(storage.path(PASSWORD_KEY), 0o600)
    registry = settings.registry.model_copy(update={"url": with_password(url, None), "password_key": PASSWORD_KEY})
    return settings.model_copy(update={"registry": registry})


class Registry(RolloutBook):
    """Versions, artifacts, aliases, lineage, deployments and rollouts of models."""

    def __init__(
        self,
        storage: str | Storage,
        db_url: str,
        *,
        cache_dir: str | Path | None = None,
        s3_endpoint: str | None = None,
        io_workers: int = 4,
    ) -> None:
        self.storage = storage if isinstance(storage, Storage) else Storage(storage, s3_endpoint=s3_endpoint)
        self.db = Database(db_url)
        default_cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rayloop"
        self.cache_dir = Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_cache
        self.io_workers = io_workers
        ensure_schema(self.db)

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
        return cls(storage, database_url(settings), cache_dir=settings.node_path / "cache")

    def __reduce__(self) -> tuple[Any, ...]:
        # Travels to Ray tasks and spawned processes as its addresses; the copy reconnects.
        return (
            _rebuild,
            (self.storage.uri, self.storage.s3_endpoint, self.db.url, str(self.cache_dir), self.io_workers),
        )

    def __repr__(self) -> str:
        return f"Registry(storage={self.storage.uri!r}, db={self.db.dialect!r})"

    # -- rows ----------------------------------------------------------------
    def _lock_model(self, tx: Tx, name: str) -> None:
        """Serialise writers of one model (a row lock on PostgreSQL; SQLite holds the db lock)."""
        if tx.lock_row("rl_models", "name = ?", (name,)) is None:
            raise NotFoundError(f"model {name!r} does not exist")

    def _aliases_of(self, tx: Tx, name: str, version: int) -> list[str]:
        rows = tx.all("SELECT alias FROM rl_aliases WHERE name = ? AND version = ? ORDER BY alias", (name, version))
        return [r["alias"] for r in rows]

    def _to_model(self, row: dict[str, Any], aliases: list[str]) -> ModelVersion:
        created = ts(row["created_at"])
        assert created is not None
        return ModelVersion(
            name=row["name"],
            version=int(row["version"]),
            fingerprint=row["fingerprint"] or "",
            manifest=json.loads(row["manifest"]),
            created_at=created,
            created_by=row["created_by"],
            parent=None if row["parent"] is None else int(row["parent"]),
            metadata=json.loads(row["metadata"]),
            lineage=json.loads(row["lineage"]),
            annotations=json.loads(row["annotations"]),
            uri=row["uri"],
            aliases=aliases,
            deleted_at=ts(row["deleted_at"]),
        )

    def _resolve_version(self, tx: Tx, ref: Ref) -> int:
        if ref.version is not None:
            return ref.version
        if ref.alias == LATEST:
            row = tx.one(
                "SELECT MAX(version) AS v FROM rl_versions WHERE name = ? AND status = 'ready'",
                (ref.name,),
            )
            if row is None or row["v"] is None:
                self._require_model(tx, ref.name)
                raise NotFoundError(f"model {ref.name!r} has no versions")
            return int(row["v"])
        row = tx.one("SELECT version FROM rl_aliases WHERE name = ? AND alias = ?", (ref.name, ref.alias))
        if row is None:
            self._require_model(tx, ref.name)
            raise NotFoundError(
                f"alias {ref.alias!r} of model {ref.name!r} is not set",
                hint=f"Point it at a version: `rayloop models alias {ref.name} {ref.alias} VERSION`.",
            )
        return int(row["version"])

    def _require_model(self, tx: Tx, name: str) -> None:
        if tx.one("SELECT name FROM rl_models WHERE name = ?", (name,)) is None:
            raise NotFoundError(f"model {name!r} does not exist")

    def _ready_row(self, tx: Tx, name: str, version: int, *, allow_deleted: bool = False) -> dict[str, Any]:
        row = tx.one("SELECT * FROM rl_versions WHERE name = ? AND version = ?", (name, version))
        if row is None or row["status"] in ("pending", "failed"):
            self._require_model(tx, name)
            raise NotFoundError(f"version {name}@{version} does not exist")
        if row["status"] == "deleted" and not allow_deleted:
            raise NotFoundError(f"version {name}@{version} was deleted at {iso(row['deleted_at'])}")
        return row

    # -- register ------------------------------------------------------------
    def register(
        self,
        name: str,
        model_dir: str | Path,
        *,
        parent: int | None = None,
        metadata: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
        actor: str = "user",
        progress: artifacts.Progress | None = None,
    ) -> ModelVersion:
        """Copy an HF model directory into storage as a new immutable version (``progress`` gets the byte
        count of each chunk copied; :func:`model_dir_bytes` is the total).

        Refuses pickle weights (:class:`UnsafeArtifactError`); requires
        ``config.json`` and ``*.safetensors``. ``lineage`` takes the keys of
        :class:`~rayloop.registry.models.Lineage`.
        """
        validate_name(name)
        files = artifacts.scan_model_dir(model_dir)
        meta_json = _dumps("metadata", _as_dict("metadata", metadata))
        try:
            lin = Lineage.model_validate(_as_dict("lineage", lineage)).model_dump(exclude_none=True)
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise RegistryError(
                f"invalid lineage: {bad}", hint=f"Allowed keys: {', '.join(Lineage.model_fields)}."
            ) from None
        lin_json = _dumps("lineage", lin)
        if parent is not None:
            validate_version(parent)
        now = time.time()
        with self.db.transaction(write=True) as tx:
            tx.execute(
                "INSERT INTO rl_models (name, next_version, created_at) VALUES (?, 1, ?) ON CONFLICT (name) DO NOTHING",
                (name, now),
            )
            self._lock_model(tx, name)
            if parent is not None:
                self._ready_row(tx, name, parent, allow_deleted=True)
            row = tx.one(
                "UPDATE rl_models SET next_version = next_version + 1 WHERE name = ? RETURNING next_version", (name,)
            )
            assert row is not None
            version = int(row["next_version"]) - 1
            prefix = artifacts.version_prefix(name, version)
            tx.execute(
                "INSERT INTO rl_versions (name, version, status, fingerprint, manifest, size_bytes, created_at,"
                " created_by, parent, metadata, lineage, annotations, uri)"
                " VALUES (?, ?, 'pending', NULL, '{}', 0, ?, ?, ?, ?, ?, '{}', ?)",
                (name, version, now, actor, parent, meta_json, lin_json, self.storage.uri_of(prefix)),
            )
        try:
            manifest = artifacts.upload_files(self.storage, files, prefix, workers=self.io_workers, progress=progress)
            fp = artifacts.fingerprint(manifest)
            doc = {"name": name, "version": version, "fingerprint": fp, "files": manifest, "parent": parent}
            doc |= {"metadata": json.loads(meta_json), "lineage": lin, "created_by": actor}
            self.storage.write_bytes(
                f"{prefix}/{artifacts.MANIFEST_FILE}", json.dumps(doc, indent=1, sort_keys=True).encode()
            )
            with self.db.transaction(write=True) as tx:
                changed = tx.execute(
                    "UPDATE rl_versions SET status = 'ready', fingerprint = ?, manifest = ?, size_bytes = ?,"
                    " created_at = ? WHERE name = ? AND version = ? AND status = 'pending'",
                    (
                        fp,
                        json.dumps(manifest, sort_keys=True),
                        sum(e["size"] for e in manifest.values()),
                        time.time(),
                        name,
                        version,
                    ),
                )
                if changed != 1:
                    raise RegistryError(
                        f"registration of {name}@{version} was cancelled meanwhile (gc took it as stale)"
                    )
        except BaseException:
            self._fail_pending(name, version, prefix)
            raise
        return self.resolve(f"{name}@{version}")

    def _fail_pending(self, name: str, version: int, prefix: str) -> None:
        """Best effort after a failed upload: the row never becomes visible; artifacts go."""
        try:
            with self.db.transaction(write=True) as tx:
                tx.execute(
                    "UPDATE rl_versions SET status = 'failed', deleted_at = ?"
                    " WHERE name = ? AND version = ? AND status = 'pending'",
                    (time.time(), name, version),
                )
        finally:
            try:
                self.storage.delete(prefix)
            except Exception:
                pass  # gc sweeps artifacts of failed versions

    # -- read ----------------------------------------------------------------
    def resolve(self, ref: str | Ref) -> ModelVersion:
        """``demo@3``, ``demo@production``, ``demo@latest`` or ``demo`` (= production) -> the version."""
        r = parse_ref(ref)
        with self.db.transaction() as tx:
            v = self._resolve_version(tx, r)
            row = self._ready_row(tx, r.name, v)
            return self._to_model(row, self._aliases_of(tx, r.name, v))

    def list_models(self) -> list[str]:
        """Names of models with at least one live version, sorted."""
        with self.db.transaction() as tx:
            rows = tx.all("SELECT DISTINCT name FROM rl_versions WHERE status = 'ready' ORDER BY name")
        return [r["name"] for r in rows]

    def list_versions(self, name: str, *, include_deleted: bool = False) -> list[ModelVersion]:
        """Versions of ``name``, oldest first (live ones; deleted too with ``include_deleted``)."""
        validate_name(name)
        statuses = ("ready", "deleted") if include_deleted else ("ready", "ready")
        with self.db.transaction() as tx:
            self._require_model(tx, name)
            rows = tx.all(
                "SELECT * FROM rl_versions WHERE name = ? AND status IN (?, ?) ORDER BY version", (name, *statuses)
            )
            aliases: dict[int, list[str]] = {}
            for a in tx.all("SELECT alias, version FROM rl_aliases WHERE name = ? ORDER BY alias", (name,)):
                aliases.setdefault(int(a["version"]), []).append(a["alias"])
        return [self._to_model(r, aliases.get(int(r["version"]), [])) for r in rows]

    def lineage(self, ref: str | Ref) -> list[ModelVersion]:
        """This version first, then its parent, back to the base model (deleted ancestors included)."""
        mv = self.resolve(ref)
        chain = [mv]
        seen = {mv.version}
        with self.db.transaction() as tx:
            parent = mv.parent
            while parent is not None and parent not in seen:
                row = tx.one("SELECT * FROM rl_versions WHERE name = ? AND version = ?", (mv.name, parent))
                if row is None:
                    break
                seen.add(parent)
                chain.append(self._to_model(row, self._aliases_of(tx, mv.name, parent)))
                parent = chain[-1].parent
        return chain

    # -- artifacts -----------------------------------------------------------
    def fetch(
        self,
        ref: str | Ref,
        dest: str | Path | None = None,
        *,
        rehash: bool = False,
        progress: artifacts.Progress | None = None,
    ) -> Path:
        """Materialise a version as a local HF model directory, every hash verified.

        Without ``dest`` the copy is cached under ``cache_dir/models/<fingerprint>``
        and reused: a cache hit checks file sizes and modification times against
        what was verified (``rehash=True`` re-hashes instead). A cached copy that
        changed is thrown away and downloaded again. A stored file that does not
        match the manifest raises :class:`IntegrityError` naming the file.
        """
        mv = self.resolve(ref)
        if dest is not None:
            return self._fetch_into(
                mv, Path(dest).expanduser().absolute(), dest_given=True, rehash=rehash, progress=progress
            )
        # The node-local cache: replicas starting together on one node share one download (the first one to
        # take the lock fetches, the others find its verified copy).
        target = self.cache_dir / "models" / mv.fingerprint
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            lock = open(target.parent / f".{mv.fingerprint}.lock", "a")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise RegistryError(
                f"cannot use the model cache {str(self.cache_dir)!r} on host {socket.gethostname()} "
                f"(uid {os.getuid()}): {e.strerror or e}",
                hint="Each node caches versions on its own disk: where the nodes do not share rayloop's home path, "
                f"start every node with {NODE_DIR_ENV}=<a writable local directory> in its environment.",
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._fetch_into(mv, target, dest_given=False, rehash=rehash, progress=progress)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _fetch_into(
        self,
        mv: ModelVersion,
        target: Path,
        *,
        dest_given: bool,
        rehash: bool,
        progress: artifacts.Progress | None,
    ) -> Path:
        if target.exists() and not target.is_dir():
            raise RegistryError(f"destination {str(target)!r} is a file", hint="Pass a directory path as dest.")
        if target.exists():
            if artifacts.local_copy_ok(target, mv.manifest, rehash=rehash):
                return target
            if dest_given and any(target.iterdir()) and not (target / artifacts.MARKER_FILE).is_file():
                raise RegistryError(
                    f"destination {str(target)!r} is not empty", hint="Pass an empty or missing directory as dest."
                )
            # A stale or modified copy: move it aside atomically, then drop it.
            aside = target.parent / f".stale-{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        prefix = artifacts.version_prefix(mv.name, mv.version)
        artifacts.download_verified(
            self.storage, prefix, mv.manifest, target, ref=mv.ref, workers=self.io_workers, progress=progress
        )
        return target

    def verify(self, ref: str | Ref, *, progress: artifacts.Progress | None = None) -> None:
        """Re-hash the stored files of a version; raise :class:`IntegrityError` naming the first bad file."""
        mv = self.resolve(ref)
        prefix = artifacts.version_prefix(mv.name, mv.version)
        key = f"{prefix}/{artifacts.MANIFEST_FILE}"
        try:
            stored = json.loads(self.storage.read_bytes(key))
        except FileNotFoundError:
            raise IntegrityError(
                f"{mv.ref}: {artifacts.MANIFEST_FILE} is missing", path=artifacts.MANIFEST_FILE
            ) from None
        except ValueError:
            raise IntegrityError(
                f"{mv.ref}: {artifacts.MANIFEST_FILE} is not JSON", path=artifacts.MANIFEST_FILE
            ) from None
        if stored.get("files") != mv.manifest or stored.get("fingerprint") != mv.fingerprint:
            raise IntegrityError(
                f"{mv.ref}: {artifacts.MANIFEST_FILE} in storage disagrees with the registry database",
                path=artifacts.MANIFEST_FILE,
            )
        artifacts.verify_stored(
            self.storage, prefix, mv.manifest, ref=mv.ref, workers=self.io_workers, progress=progress
        )

    # -- aliases -------------------------------------------------------------
    def get_alias(self, name: str, alias: str) -> int | None:
        validate_name(name)
        with self.db.transaction() as tx:
            row = tx.one("SELECT version FROM rl_aliases WHERE name = ? AND alias = ?", (name, alias))
        return None if row is None else int(row["version"])

    def aliases(self, name: str) -> dict[str, int]:
        """alias -> version for one model."""
        validate_name(name)
        with self.db.transaction() as tx:
            rows = tx.all("SELECT alias, version FROM rl_aliases WHERE name = ? ORDER BY alias", (name,))
        return {r["alias"]: int(r["version"]) for r in rows}

    @staticmethod
    def _check_expect(name: str, alias: str, current: int | None, expect: int | None) -> None:
        if expect is None:
            return
        if expect == ABSENT and current is not None:
            raise AliasConflictError(
                f"alias {name}@{alias} already points to version {current}; expected it to be unset"
            )
        if expect != ABSENT and current != expect:
            now = "is unset" if current is None else f"points to version {current}"
            raise AliasConflictError(f"alias {name}@{alias} {now}, not version {expect} as expected")

    def _log_move(
        self, tx: Tx, name: str, alias: str, old: int | None, new: int | None, actor: str, reason: str
    ) -> None:
        tx.execute(
            "INSERT INTO rl_alias_log (name, alias, from_version, to_version, actor, reason, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, alias, old, new, actor, reason, time.time()),
        )

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        expect: int | None = None,
        actor: str = "user",
        reason: str = "",
        fence: Fence | None = None,
    ) -> int | None:
        """Point ``alias`` at ``version``, atomically, with compare-and-set; return where it pointed before.

        ``expect=None``: move regardless of where it points. ``expect=N``: only
        if it points at N now. ``expect=ABSENT`` (0): only if it is unset. A
        lost race raises :class:`AliasConflictError`. Every move is logged.
        """
        validate_name(name)
        validate_alias(alias)
        validate_version(version)
        with self.db.transaction(write=True) as tx:
            check_fence(tx, fence)
            self._lock_model(tx, name)
            self._ready_row(tx, name, version)
            row = tx.one("SELECT version FROM rl_aliases WHERE name = ? AND alias = ?", (name, alias))
            current = None if row is None else int(row["version"])
            self._check_expect(name, alias, current, expect)
            if current == version:
                return current
            if current is None:
                tx.execute(
                    "INSERT INTO rl_aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?)",
                    (name, alias, version, time.time()),
                )
            else:
                tx.execute(
                    "UPDATE rl_aliases SET version = ?, updated_at = ? WHERE name = ? AND alias = ?",
                    (version, time.time(), name, alias),
                )
            self._log_move(tx, name, alias, current, version, actor, reason)
        return current

    def delete_alias(
        self,
        name: str,
        alias: str,
        *,
        expect: int | None = None,
        actor: str = "user",
        reason: str = "",
        fence: Fence | None = None,
    ) -> int:
        """Remove an alias (compare-and-set like :meth:`set_alias`); the removal is logged. Return its old version."""
        validate_name(name)
        validate_alias(alias)
        with self.db.transaction(write=True) as tx:
            check_fence(tx, fence)
            self._lock_model(tx, name)
            row = tx.one("SELECT version FROM rl_aliases WHERE name = ? AND alias = ?", (name, alias))
            if row is None:
                raise NotFoundError(f"alias {alias!r} of model {name!r} is not set")
            current = int(row["version"])
            self._check_expect(name, alias, current, expect)
            tx.execute("DELETE FROM rl_aliases WHERE name = ? AND alias = ?", (name, alias))
            self._log_move(tx, name, alias, current, None, actor, reason)
        return current

    def alias_history(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Audit log, oldest first: ``{time, name, alias, from, to, actor, reason}`` (time in ISO 8601 UTC)."""
        validate_name(name)
        sql = "SELECT * FROM rl_alias_log WHERE name = ?"
        params: tuple[Any, ...] = (name,)
        if alias is not None:
            sql, params = sql + " AND alias = ?", (name, alias)
        with self.db.transaction() as tx:
            rows = tx.all(sql + " ORDER BY id", params)
        return [
            {
                "time": iso(r["at"]),
                "name": r["name"],
                "alias": r["alias"],
                "from": r["from_version"],
                "to": r["to_version"],
                "actor": r["actor"],
                "reason": r["reason"],
            }
            for r in rows
        ]

    # -- annotations ---------------------------------------------------------
    def annotate(
        self, ref: str | Ref, key: str, value: Any, *, actor: str = "user", fence: Fence | None = None
    ) -> None:
        """Attach JSON to a version under ``key`` (replacing an earlier value); artifacts stay untouched.

        Used for the evaluation report, the gate decision, golden outputs.
        ``actor`` and the time are kept under ``annotations["_log"]``.
        """
        validate_key(key)
        value_json = _dumps(f"annotation {key!r}", value)
        r = parse_ref(ref)
        with self.db.transaction(write=True) as tx:
            check_fence(tx, fence)
            self._lock_model(tx, r.name)
            version = self._resolve_version(tx, r)
            row = self._ready_row(tx, r.name, version)
            notes = json.loads(row["annotations"])
            notes[key] = json.loads(value_json)
            notes.setdefault("_log", []).append({"key": key, "actor": actor, "time": iso(time.time())})
            tx.execute(
                "UPDATE rl_versions SET annotations = ? WHERE name = ? AND version = ?",
                (json.dumps(notes, sort_keys=True), r.name, version),
            )

    # -- deployments ---------------------------------------------------------
    def mark_deployed(self, name: str, version: int, slot: str, app: str, *, fence: Fence | None = None) -> None:
        """Record that ``app``'s ``slot`` serves ``name@version`` (a deployed version cannot be deleted)."""
        validate_name(name)
        validate_key(slot)
        validate_key(app)
        with self.db.transaction(write=True) as tx:
            check_fence(tx, fence)
            self._lock_model(tx, name)
            self._ready_row(tx, name, version)
            tx.execute("DELETE FROM rl_deployments WHERE name = ? AND app = ? AND slot = ?", (name, app, slot))
            tx.execute(
                "INSERT INTO rl_deployments (name, app, slot, version, since) VALUES (?, ?, ?, ?, ?)",
                (name, app, slot, version, time.time()),
            )

    def unmark_deployed(self, name: str, slot: str, app: str, *, fence: Fence | None = None) -> None:
        """Forget that ``app``'s ``slot`` serves ``name`` (no error if it did not)."""
        validate_name(name)
        with self.db.transaction(write=True) as tx:
            check_fence(tx, fence)
            tx.execute("DELETE FROM rl_deployments WHERE name = ? AND app = ? AND slot = ?", (name, app, slot))

    def deployments(self, name: str) -> list[dict[str, Any]]:
        """``[{name, version, app, slot, since}]`` for one model."""
        validate_name(name)
        with self.db.transaction() as tx:
            rows = tx.all("SELECT * FROM rl_deployments WHERE name = ? ORDER BY app, slot", (name,))
        return [
            {
                "name": r["name"],
                "version": int(r["version"]),
                "app": r["app"],
                "slot": r["slot"],
                "since": iso(r["since"]),
            }
            for r in rows
        ]

    # -- delete / gc ---------------------------------------------------------
    def _users(self, tx: Tx, name: str, version: int) -> list[str]:
        """Why a version cannot go: aliases, deployments, active rollouts."""
        users = [f"alias {a!r}" for a in self._aliases_of(tx, name, version)]
        for d in tx.all("SELECT app, slot FROM rl_deployments WHERE name = ? AND version = ?", (name, version)):
            users.append(f"deployment {d['app']}/{d['slot']}")
        for ro in tx.all(
            "SELECT id FROM rl_rollouts WHERE name = ? AND active = 1 AND (to_version = ? OR from_version = ?)",
            (name, version, version),
        ):
            users.append(f"active rollout {ro['id']}")
        return users

    def delete(self, ref: str | Ref) -> None:
        """Delete a version's artifacts; refused (:class:`InUseError`) if aliased, deployed or in a rollout.

        The row stays (status deleted) so lineage still shows it; the number is never reused.
        """
        r = parse_ref(ref)
        with self.db.transaction(write=True) as tx:
            self._lock_model(tx, r.name)
            version = self._resolve_version(tx, r)
            self._ready_row(tx, r.name, version)
            users = self._users(tx, r.name, version)
            if users:
                raise InUseError(f"cannot delete {r.name}@{version}: in use by {', '.join(users)}")
            tx.execute(
                "UPDATE rl_versions SET status = 'deleted', deleted_at = ? WHERE name = ? AND version = ?",
                (time.time(), r.name, version),
            )
        self.storage.delete(artifacts.version_prefix(r.name, version))

    def gc(self, name: str, keep: int, *, dry_run: bool = False) -> list[int]:
        """Delete live versions older than the newest ``keep`` that nothing uses; return their numbers.

        Also removes artifacts of failed registrations and of ones pending for
        longer than a day (crashed uploads).
        """
        validate_name(name)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise RegistryError(f"keep must be a non-negative integer, got {keep!r}")
        now = time.time()
        with self.db.transaction(write=True) as tx:
            self._lock_model(tx, name)
            rows = tx.all(
                "SELECT version FROM rl_versions WHERE name = ? AND status = 'ready' ORDER BY version DESC", (name,)
            )
            doomed = [int(r["version"]) for r in rows[keep:] if not self._users(tx, name, int(r["version"]))]
            stale = tx.all(
                "SELECT version FROM rl_versions"
                " WHERE name = ? AND (status = 'failed' OR (status = 'pending' AND created_at < ?))",
                (name, now - PENDING_TIMEOUT_S),
            )
            if dry_run:
                return sorted(doomed)
            for v in doomed:
                tx.execute(
                    "UPDATE rl_versions SET status = 'deleted', deleted_at = ? WHERE name = ? AND version = ?",
                    (now, name, v),
                )
            tx.execute(
                "UPDATE rl_versions SET status = 'failed', deleted_at = ?"
                " WHERE name = ? AND status = 'pending' AND created_at < ?",
                (now, name, now - PENDING_TIMEOUT_S),
            )
        for v in [*doomed, *(int(s["version"]) for s in stale)]:
            self.storage.delete(artifacts.version_prefix(name, v))
        return sorted(doomed)


def _rebuild(storage_uri: str, s3_endpoint: str | None, db_url: str, cache_dir: str, io_workers: int) -> Registry:
    return Registry(storage_uri, db_url, cache_dir=cache_dir, s3_endpoint=s3_endpoint, io_workers=io_workers)


def model_dir_on_this_node(path: str | Path, ref: str | None, settings: Settings | dict[str, Any]) -> Path:
    """The model directory to load here: ``path`` where this node has it, else version ``ref`` fetched from
    the registry into this node's cache (:attr:`Settings.node_path`).

    Drivers resolve model directories on their own node; the training workers and evaluation engines that
    load them may run on others, which do not have the driver's disk. Called there, with the ref the driver
    resolved (``NAME@VERSION``) and the driver's settings (a :meth:`Settings.dump` travels too).
    """
    p = Path(path)
    if _readable_model_dir(p):
        return p
    if ref is None:
        raise RegistryError(
            f"model directory {str(p)!r} is not on host {socket.gethostname()} (uid {os.getuid()}), and it is no "
            "registered version that this node could fetch",
            hint="Register the model (`rayloop models register NAME DIR`) and pass NAME@VERSION, so every node "
            "fetches it from storage; or put the directory on a disk all nodes mount.",
        )
    s = settings if isinstance(settings, Settings) else Settings.model_validate(settings)
    return Registry.from_settings(s).fetch(ref)


def _readable_model_dir(p: Path) -> bool:
    try:
        return (p / "config.json").is_file() and os.access(p / "config.json", os.R_OK)
    except OSError:  # a directory above it this user may not enter
        return False
