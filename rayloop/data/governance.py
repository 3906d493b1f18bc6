"""Data governance: retention and forgetting a user.

- :func:`prune` deletes every date partition of captured data (interactions, feedback, shadow pairs and
  their quarantine) older than ``data.retention_days`` (or a given age). ``rayloop data prune`` runs it,
  and so does the pipeline before it collects, when ``data.retention_days`` is set. Snapshots keep the
  list of partitions they were built from (``sources`` in their manifest), so what a model learned from
  stays known after the rows are gone.
- :func:`forget_user` removes one user's rows from interactions, feedback (theirs, and any on their
  requests), shadow pairs, quarantine and preprocessing staging data, rewriting each file that held one;
  removes the text of their requests from every snapshot that held it, deletes that snapshot's packed
  training blocks (token ids cannot be traced back to a request) and marks its manifest, so it is never
  trained on again; and annotates the registry versions trained from those snapshots. Lineage keeps the
  fact (a pseudonymous subject id, counts, when), never the text or the user id.

Both write a record under ``governance/`` in storage. Files are rewritten under a hidden temporary name
and moved into place, so a reader sees the old file or the new one, never half of one. Rows of the user
still in the capture writer's buffer (at most ``serving.capture_flush_s``) are written after a run has
passed: block the user's key first, and run it again after that interval to be sure.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from rayloop.config import Settings
from rayloop.data.capture import QUARANTINE_DIR, TMP_PREFIX
from rayloop.data.schema import FEEDBACK_DIR, INTERACTIONS_DIR, SHADOW_DIR, SNAPSHOTS_DIR
from rayloop.data.snapshot import MANIFEST, snapshot_key, storage_of
from rayloop.errors import ConfigError
from rayloop.storage import Storage

GOVERNANCE_DIR = "governance"
CAPTURED = (INTERACTIONS_DIR, FEEDBACK_DIR, SHADOW_DIR, QUARANTINE_DIR)
STAGING = posixpath.join(SNAPSHOTS_DIR, "_staging")


@dataclass
class PruneReport:
    cutoff: str  # partitions dated before this day were deleted
    dry_run: bool
    partitions: dict[str, list[str]] = field(default_factory=dict)  # table -> deleted date partitions
    files: dict[str, int] = field(default_factory=dict)  # table -> files in them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ForgetReport:
    subject: str  # a pseudonymous id of the user: the first 16 hex digits of sha256(user id)
    dry_run: bool
    requests: int = 0  # the user's request ids found in interactions
    rows_removed: dict[str, int] = field(default_factory=dict)  # table -> rows
    files_rewritten: int = 0
    snapshots_marked: list[str] = field(default_factory=list)
    versions_marked: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def subject_id(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]


def _visible(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return not name.startswith((".", "_")) and not name.startswith(TMP_PREFIX)


def _record(st: Storage, kind: str, report: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    key = posixpath.join(GOVERNANCE_DIR, f"{now.strftime('%Y%m%dT%H%M%S')}-{kind}-{uuid.uuid4().hex[:8]}.json")
    st.write_bytes(key, json.dumps({"kind": kind, "at": now.isoformat(), **report}, indent=1).encode())


def _replace(st: Storage, key: str, payload: bytes | None) -> None:
    """Put ``payload`` at ``key`` (written under a hidden name, then moved over it); None deletes the file."""
    if payload is None:
        st.delete(key)
        return
    tmp = posixpath.join(posixpath.dirname(key), f"{TMP_PREFIX}{uuid.uuid4().hex}")
    st.write_bytes(tmp, payload)
    st.fs.move(st.path(tmp), st.path(key))


# -- retention -------------------------------------------------------------------------
def _partition_day(key: str) -> str | None:
    for seg in posixpath.dirname(key).split("/"):
        k, sep, v = seg.partition("=")
        if sep and k == "date":
            return v
    return None


def prune(
    settings: Settings, *, older_than_days: int | None = None, dry_run: bool = False, today: date | None = None
) -> PruneReport:
    """Delete captured data in date partitions older than ``older_than_days`` (default ``data.retention_days``)."""
    days = settings.data.retention_days if older_than_days is None else older_than_days
    if days is None:
        raise ConfigError(
            "no retention age: data.retention_days is not set",
            hint="Set data.retention_days in rayloop.yaml (or RAYLOOP_DATA__RETENTION_DAYS), or pass --older-than.",
        )
    if days < 1:
        raise ConfigError(f"a retention age must be at least 1 day, not {days}")
    cutoff = ((today or datetime.now(UTC).date()) - timedelta(days=days)).isoformat()
    st = storage_of(settings)
    report = PruneReport(cutoff=cutoff, dry_run=dry_run)
    for table in CAPTURED:
        old: dict[str, int] = {}  # partition directory -> files
        for key in st.list(table):
            day = _partition_day(key)
            if day is not None and day < cutoff:
                part = key[: key.index(f"date={day}") + len(f"date={day}")]
                old[part] = old.get(part, 0) + 1
        if not old:
            continue
        report.partitions[table] = sorted(old)
        report.files[table] = sum(old.values())
        if not dry_run:
            for part in sorted(old):
                st.delete(part)
    if not dry_run and report.partitions:
        _record(st, "prune", report.to_dict())
    return report


# -- forgetting a user -------------------------------------------------------------------
def _filter_parquet(st: Storage, key: str, drop: Any) -> tuple[bytes | None, int] | None:
    """``(new file or None if empty, rows removed)`` for a Parquet file, or None when nothing is removed.

    ``drop(table) -> pyarrow boolean mask`` of the rows to remove.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with st.fs.open_input_file(st.path(key)) as f:
        table = pq.read_table(f)
    mask = drop(table)
    if mask is None:
        return None
    removed = int(pc.sum(mask).as_py() or 0)
    if removed == 0:
        return None
    kept = table.filter(pc.invert(mask))
    if kept.num_rows == 0:
        return None, removed
    buf = io.BytesIO()
    pq.write_table(kept, buf)
    return buf.getvalue(), removed


def _mask(table: Any, user_id: str | None, request_ids: set[str]) -> Any:
    """Rows of ``user_id`` (when given) or on one of ``request_ids``; None when the table has neither column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    masks = []
    if user_id is not None and "user_id" in table.column_names:
        masks.append(pc.fill_null(pc.equal(table.column("user_id"), pa.scalar(user_id)), False))
    if request_ids and "request_id" in table.column_names:
        masks.append(pc.is_in(table.column("request_id"), value_set=pa.array(sorted(request_ids), pa.string())))
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = pc.or_(out, m)
    return out


def _user_request_ids(st: Storage, user_id: str) -> set[str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for key in st.list(INTERACTIONS_DIR):
        if not (key.endswith(".parquet") and _visible(key)):
            continue
        with st.fs.open_input_file(st.path(key)) as f:
            t = pq.read_table(f, columns=["request_id", "user_id"])
        hit = t.filter(pc.fill_null(pc.equal(t.column("user_id"), user_id), False))
        ids.update(hit.column("request_id").to_pylist())
    return ids


def _forget_in_jsonl(st: Storage, key: str, user_id: str, request_ids: set[str]) -> tuple[bytes | None, int] | None:
    kept: list[bytes] = []
    removed = 0
    for line in st.read_bytes(key).splitlines(keepends=True):
        try:
            row = json.loads(line).get("row")
        except ValueError:
            kept.append(line)
            continue
        if isinstance(row, dict) and (row.get("user_id") == user_id or row.get("request_id") in request_ids):
            removed += 1
        else:
            kept.append(line)
    if not removed:
        return None
    return (b"".join(kept) or None), removed


def forget_user(settings: Settings, user_id: str, *, dry_run: bool = False) -> ForgetReport:
    """Remove everything rayloop stored about ``user_id`` (see the module docstring); returns what it did."""
    if not user_id or not user_id.strip():
        raise ConfigError(
            "a user id to forget must not be blank", hint="Pass --user ID (the `user` field clients sent)."
        )
    st = storage_of(settings)
    report = ForgetReport(subject=subject_id(user_id), dry_run=dry_run)
    ids = _user_request_ids(st, user_id)
    report.requests = len(ids)

    def rewrite(table: str, key: str, result: tuple[bytes | None, int] | None) -> None:
        if result is None:
            return
        payload, removed = result
        report.rows_removed[table] = report.rows_removed.get(table, 0) + removed
        report.files_rewritten += 1
        if not dry_run:
            _replace(st, key, payload)

    for table in (INTERACTIONS_DIR, FEEDBACK_DIR, SHADOW_DIR):
        for key in list(st.list(table)):
            if key.endswith(".parquet") and _visible(key):
                rewrite(table, key, _filter_parquet(st, key, lambda t: _mask(t, user_id, ids)))
    for key in list(st.list(QUARANTINE_DIR)):
        if key.endswith(".jsonl") and _visible(key):
            rewrite(QUARANTINE_DIR, key, _forget_in_jsonl(st, key, user_id, ids))
    for key in list(st.list(STAGING)):
        if key.endswith(".parquet") and not posixpath.basename(key).startswith((".", TMP_PREFIX)):
            rewrite("staging", key, _filter_parquet(st, key, lambda t: _mask(t, user_id, ids)))

    report.snapshots_marked = _forget_in_snapshots(st, report, ids, dry_run=dry_run)
    if report.snapshots_marked:
        report.versions_marked = _mark_versions(settings, report, dry_run=dry_run)
    if not dry_run:
        _record(st, "forget", report.to_dict())
    return report


def _snapshot_ids(st: Storage) -> list[str]:
    """Finished snapshots: ``snapshots/<id>/manifest.json`` exists."""
    found = set()
    for key in st.list(SNAPSHOTS_DIR):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST and parts[1] != "_staging":
            found.add(parts[1])
    return sorted(found)


def _forget_in_snapshots(st: Storage, report: ForgetReport, ids: set[str], *, dry_run: bool) -> list[str]:
    """Remove the requests' pairs from every snapshot holding them, drop its blocks, mark its manifest."""
    marked: list[str] = []
    if not ids:
        return marked
    for sid in _snapshot_ids(st):
        removed = 0
        for key in list(st.list(snapshot_key(sid))):
            if "/pairs/" in key and key.endswith(".parquet") and _visible(key):
                result = _filter_parquet(st, key, lambda t: _mask(t, None, ids))
                if result is not None:
                    removed += result[1]
                    report.files_rewritten += 1
                    if not dry_run:
                        _replace(st, key, result[0])
        if not removed:
            continue
        marked.append(sid)
        report.rows_removed["snapshot_pairs"] = report.rows_removed.get("snapshot_pairs", 0) + removed
        if dry_run:
            continue
        manifest = json.loads(st.read_bytes(snapshot_key(sid, MANIFEST)))
        for split in manifest.get("layout", {}):
            blocks = snapshot_key(sid, manifest["layout"][split]["blocks"])
            if st.exists(blocks):
                st.delete(blocks)
        manifest.setdefault("forgotten", []).append(
            {"at": datetime.now(UTC).isoformat(), "subject": report.subject, "pairs_removed": removed}
        )
        manifest["trainable"] = False
        _replace(st, snapshot_key(sid, MANIFEST), json.dumps(manifest, indent=1).encode())
    return marked


def _mark_versions(settings: Settings, report: ForgetReport, *, dry_run: bool) -> list[str]:
    """Annotate every registry version trained from a marked snapshot (the fact, not the text)."""
    from rayloop.registry import Registry

    reg = Registry.from_settings(settings)
    refs = []
    for name in reg.list_models():
        for mv in reg.list_versions(name):
            if mv.lineage.get("snapshot_id") in report.snapshots_marked:
                ref = f"{name}@{mv.version}"
                refs.append(ref)
                if not dry_run:
                    prior = list(mv.annotations.get("forgotten_data", []))
                    prior.append(
                        {
                            "at": datetime.now(UTC).isoformat(),
                            "subject": report.subject,
                            "snapshot_id": mv.lineage["snapshot_id"],
                        }
                    )
                    reg.annotate(ref, "forgotten_data", prior, actor="rayloop data forget")
    return refs
