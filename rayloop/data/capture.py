"""Interaction capture: rows from the serving path to Parquet, without slowing it down.

Three pieces:

- :class:`CaptureWriter`: one Ray actor per storage root (named, detached, so
  every ingress replica and every app share it and feedback can find any
  request id). It buffers rows per table and writes one Parquet file per
  partition and batch (``capture_batch_rows`` rows or ``capture_batch_bytes``
  bytes, or every ``capture_flush_s``), under the layout of
  :mod:`rayloop.data.schema`.
- :class:`CaptureClient`: what a replica holds. ``record()`` only appends to a
  bounded local buffer (a full buffer drops the row and counts it); a
  background task ships batches to the writer. A request never waits for
  storage and never fails because of it. ``close()`` flushes both ends.
- :func:`read_interactions` / :func:`read_feedback`: ``pyarrow.dataset``
  readers for tests and the data team.

Capture is at least once, and one bad row never costs the others:

- Strings that UTF-8 cannot encode (lone UTF-16 surrogates) are made safe when
  the writer takes the row (see :func:`_safe_str`); a row that still does not
  fit its table's schema goes alone to ``quarantine/<table>/date=D/part-*.jsonl``
  (one JSON object a line: table, reason, a JSON-safe copy of the row) and the
  rest of its batch is written.
- A storage write that fails (disk full, S3 5xx, timeout) is retried with
  exponential backoff (``capture_write_attempts``); then the encoded file goes to
  a bounded journal on the writer's node (``capture_journal_dir``) and is written
  to storage on the next successful flush (also after a writer restart on the
  same node). Only rows past ``capture_journal_max_bytes`` are dropped.
- Every file is written under a hidden name (``.tmp-<uuid>``, no ``.parquet``
  suffix) and moved into place: ``pyarrow.dataset`` ignores names starting with
  ``.``/``_`` and :mod:`rayloop.data.sources` lists ``*.parquet`` only, so
  readers never see half a file.
- ``CaptureWriter.stats()`` counts written, sanitised, quarantined, spilled,
  replayed and dropped rows per table.

    >>> # inside a Serve replica
    >>> # client = CaptureClient.for_settings(settings); client.record("interactions", row)
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import logging
import math
import os
import posixpath
import random
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayloop.config import NODE_DIR_ENV, Settings
from rayloop.data.schema import (
    FEEDBACK_DIR,
    FEEDBACK_SCHEMA,
    INTERACTION_SCHEMA,
    INTERACTIONS_DIR,
    SHADOW_SCHEMA,
    feedback_partition,
    interaction_partition,
    shadow_partition,
)
from rayloop.errors import DataError
from rayloop.storage import Storage

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

NAMESPACE = "rayloop"
RECENT_IDS = 100_000  # request ids the writer remembers for feedback lookups without a disk scan
ID_INDEX_CAPACITY = 10_000_000  # request ids the Bloom filter holds at 1% false positives (~12 MB); more only
# raise that rate (an unknown id then costs a scan), never hide a captured one
MAX_SCANS = 2  # disk scans for ids the index may hold, at once
CLIENT_SHIP_S = 0.5  # a replica hands its rows to the writer (on disk there, write-ahead) at least this often
QUARANTINE_DIR = "quarantine"  # quarantine/<table>/date=YYYY-MM-DD/part-<uuid>.jsonl
TMP_PREFIX = ".tmp-"  # files being written; hidden from every reader (no .parquet suffix either)
_DEFAULTS = {  # the Settings defaults, for writers built without settings (tests, scripts)
    "batch_bytes": 8 << 20,
    "max_buffer_bytes": 64 << 20,
    "write_attempts": 5,
    "retry_base_s": 0.2,
    "retry_max_s": 5.0,
    "journal_max_bytes": 1 << 30,
}


def _date(row: dict[str, Any]) -> str:
    ts = row["timestamp"]
    return (ts if isinstance(ts, datetime) else datetime.fromtimestamp(float(ts), UTC)).strftime("%Y-%m-%d")


def _seg(value: Any) -> str:
    """A partition value as a path segment; a value that would make more segments is refused."""
    text = str(value)
    if not text or "/" in text or "\\" in text or text in (".", ".."):
        raise ValueError(f"partition value {text!r} is empty or holds a path separator")
    return text


_TABLES: dict[str, tuple[Any, Callable[[dict[str, Any]], str]]] = {
    "interactions": (
        INTERACTION_SCHEMA,
        lambda r: interaction_partition(_date(r), _seg(r["model_name"]), int(r["model_version"])),
    ),
    "feedback": (FEEDBACK_SCHEMA, lambda r: feedback_partition(_date(r))),
    "shadow": (SHADOW_SCHEMA, lambda r: shadow_partition(_date(r), _seg(r["model_name"]))),
}


def writer_name(storage_root: str) -> str:
    """One writer per storage root: tests with different roots never share one."""
    return "rayloop-capture-" + hashlib.sha256(storage_root.encode()).hexdigest()[:12]


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- making rows safe -----------------------------------------------------------
_SURROGATE_PAIR = re.compile(r"[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _safe_str(text: str) -> tuple[str, int]:
    """``text`` in a form UTF-8 (so Parquet) can hold, and its UTF-8 size.

    A Python ``str`` fails to encode as UTF-8 only when it holds UTF-16 surrogates
    (``"\\ud800"``: from ``surrogateescape`` decoding, JSON ``"\\ud800"`` escapes,
    a client that split an emoji). A pair of halves is joined into the character it
    encodes; a lone one becomes the six characters ``\\ud800``. Why this form:
    ``surrogatepass`` would store bytes that are not valid UTF-8 (pyarrow, Ray Data,
    DuckDB and Spark reject or mangle such strings, so the row would break readers
    instead of the writer); ``replace`` would keep only ``?`` and lose which code
    unit it was. The escape keeps the content visible and recoverable, and inside
    the JSON-encoded columns (``messages``, ``sampling_params``) it is JSON's own
    escape for that code unit, so ``json.loads`` gives back the original string.
    """
    try:
        return text, len(text.encode("utf-8"))
    except UnicodeEncodeError:
        pass
    text = _SURROGATE_PAIR.sub(lambda m: m.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le"), text)
    text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text, len(text.encode("utf-8"))


def _sanitise_row(row: Any) -> tuple[dict[str, Any], int, bool]:
    """``(row, approximate bytes, changed)``: strings made UTF-8 safe, a numeric timestamp made a datetime.

    The caller's dict is copied only when something changes. Raises TypeError for a row that is not a mapping.
    """
    if not isinstance(row, dict):
        raise TypeError(f"a row must be a dict, not {type(row).__name__}")
    nbytes = 0
    out: dict[str, Any] | None = None
    for k, v in row.items():
        if isinstance(v, str):
            safe, n = _safe_str(v)
            nbytes += n + 8
            if safe is not v:
                out = dict(row) if out is None else out
                out[k] = safe
        else:
            nbytes += 16
    changed = out is not None
    ts = row.get("timestamp")
    if isinstance(ts, int | float) and not isinstance(ts, bool):  # epoch seconds, as _date() reads them
        out = dict(row) if out is None else out
        out["timestamp"] = datetime.fromtimestamp(float(ts), UTC)
    return (row if out is None else out), nbytes, changed


PII_COLUMNS = ("messages", "prompt", "completion", "correction", "primary_completion", "shadow_completion")


def _scrub_text_columns(row: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``row`` with personal data scrubbed from its text columns (``serving.capture_scrub_pii``), and whether
    there was any (the row is copied only then)."""
    from rayloop.data.pii import scrub

    out: dict[str, Any] | None = None
    for col in PII_COLUMNS:
        v = row.get(col)
        if isinstance(v, str) and v:
            clean, counts = scrub(v)
            if any(counts.values()):
                out = dict(row) if out is None else out
                out[col] = clean
    return (row, False) if out is None else (out, True)


def _row_bytes(row: Any) -> int:
    """Cheap size estimate for the client's buffer (characters, not encoded bytes)."""
    if not isinstance(row, dict):
        return 64
    return sum(len(v) + 8 if isinstance(v, str) else 16 for v in row.values())


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return _safe_str(value)[0]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {_safe_str(str(k))[0]: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return _safe_str(repr(value))[0]


def _reason(e: BaseException) -> str:
    return _safe_str(f"{type(e).__name__}: {e}")[0][:500]


def _quarantine_line(table: str, row: Any, reason: str) -> bytes:
    rec = {"table": table, "reason": reason, "quarantined_at": utcnow().isoformat(), "row": _jsonable(row)}
    return (json.dumps(rec, ensure_ascii=True) + "\n").encode("ascii")


def _quarantine_date(row: Any) -> str:
    try:
        return _date(row)
    except Exception:
        return utcnow().strftime("%Y-%m-%d")


def _to_table(schema: pa.Schema, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a table of ``schema``; raises for a value that does not convert or a required field left empty."""
    import pyarrow as pa

    tbl = pa.Table.from_pylist(rows, schema=schema)
    missing = [f.name for f in schema if not f.nullable and tbl.column(f.name).null_count]
    if missing:
        raise ValueError(f"required field(s) {', '.join(missing)} missing or null")
    return tbl


def _encode(schema: pa.Schema, rows: list[dict[str, Any]]) -> tuple[bytes | None, int, list[tuple[Any, str]]]:
    """``(parquet bytes or None, rows in them, [(bad row, reason)])``.

    The whole batch converts in one go; only when that fails is each row converted on its own, so the bad
    ones are found and every other row is still written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad: list[tuple[Any, str]] = []
    try:
        tbl = _to_table(schema, rows)
    except Exception:
        good = []
        for row in rows:
            try:
                _to_table(schema, [row])
            except Exception as e:
                bad.append((row, _reason(e)))
            else:
                good.append(row)
        if not good:
            return None, 0, bad
        rows = good
        try:
            tbl = _to_table(schema, rows)
        except Exception as e:  # each row converts alone but not together: keep them all, in quarantine
            return None, 0, bad + [(r, _reason(e)) for r in rows]
    sink = pa.BufferOutputStream()
    try:
        pq.write_table(tbl, sink, compression="zstd")
    except Exception as e:
        return None, 0, bad + [(r, _reason(e)) for r in rows]
    return sink.getvalue().to_pybytes(), tbl.num_rows, bad


# -- the local journal ------------------------------------------------------------
class _Journal:
    """Files storage refused, kept on the writer's node until storage takes them (bounded in bytes).

    One file per refused write: ``<ns>-<uuid>.entry`` holding a JSON header line (target key, table, kind,
    rows) and then the payload, exactly the bytes meant for storage. Entries are written under a hidden name,
    fsynced and renamed, so a crash leaves whole entries only; a new writer on the same node and directory
    finds them and replays them.
    """

    SUFFIX = ".entry"

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.bytes = 0
        self.rows = 0
        self.entries = 0
        self._lock = threading.Lock()
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    p.unlink(missing_ok=True)  # a spill cut short by a crash: the entry was never complete
                elif p.name.endswith(self.SUFFIX):
                    try:
                        header = self._header(p)
                    except Exception:
                        logger.exception("capture journal: unreadable entry %s left aside", p)
                        p.rename(p.with_suffix(".corrupt"))
                        continue
                    self.bytes += p.stat().st_size
                    self.rows += int(header["rows"])
                    self.entries += 1

    @staticmethod
    def _header(path: Path) -> dict[str, Any]:
        with open(path, "rb") as f:
            header: dict[str, Any] = json.loads(f.readline())
        return header

    def add(self, header: dict[str, Any], payload: bytes) -> bool:
        """Keep one entry; False (nothing kept) if it would pass ``max_bytes``. Raises OSError (disk)."""
        head = (json.dumps(header, ensure_ascii=True) + "\n").encode("ascii")
        size = len(head) + len(payload)
        with self._lock:
            if self.bytes + size > self.max_bytes:
                return False
            self.bytes += size  # reserved: concurrent adds cannot pass the bound together
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{self.SUFFIX}"
            tmp = self.dir / f"{TMP_PREFIX}{name}"
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            with self._lock:
                self.bytes -= size
            raise
        with self._lock:
            self.rows += int(header["rows"])
            self.entries += 1
        return True

    def paths(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.name.endswith(self.SUFFIX))

    def read(self, path: Path) -> tuple[dict[str, Any], bytes]:
        with open(path, "rb") as f:
            header: dict[str, Any] = json.loads(f.readline())
            return header, f.read()

    def remove(self, path: Path, header: dict[str, Any]) -> None:
        size = path.stat().st_size
        path.unlink()
        with self._lock:
            self.bytes -= size
            self.rows -= int(header["rows"])
            self.entries -= 1

    def set_aside(self, path: Path) -> None:
        """An entry that cannot be read: renamed ``*.corrupt`` (kept for an operator), no longer counted."""
        size = path.stat().st_size
        path.rename(path.with_suffix(".corrupt"))
        with self._lock:
            self.bytes -= size
            self.entries -= 1

    def describe(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "entries": self.entries,
            "rows": self.rows,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
        }


# -- the write-ahead log ----------------------------------------------------------
def _wal_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    return {"$repr": _safe_str(repr(value))[0]}


def _wal_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$datetime" in obj:
        return datetime.fromisoformat(obj["$datetime"])
    if len(obj) == 1 and "$repr" in obj:
        return obj["$repr"]
    return obj


class _WriteAhead:
    """Every row the writer accepts, on its node's disk before ``append`` returns (so a killed writer loses none).

    One JSON line per ``append`` call (``{"table": ..., "rows": [...]}``) in the open segment,
    ``wal/<ns>-<writer>.wal`` under the journal directory. The segment is flushed to the OS, not fsynced:
    it survives the writer process, not its node. :meth:`rotate` closes the open segment; the writer removes
    closed segments once a full flush has put their rows in storage (or the journal). A new writer on the
    same node reads the segments it finds (:meth:`recover`) and buffers their rows again: a row may then be
    written twice (at least once; readers count distinct request ids), never lost.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._id = uuid.uuid4().hex[:8]
        self._file: Any = None
        self._path: Path | None = None
        self.closed: list[Path] = []
        self.errors = 0

    def recover(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """``[(table, rows)]`` from the segments a previous writer left; they count as closed from now on."""
        out: list[tuple[str, list[dict[str, Any]]]] = []
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.glob("*.wal")):
            try:
                with open(path, "rb") as f:
                    for line in f:
                        if not line.endswith(b"\n"):
                            break  # cut short by the crash: that append never returned, its client kept the rows
                        rec = json.loads(line, object_hook=_wal_hook)
                        out.append((str(rec["table"]), list(rec["rows"])))
            except Exception:
                logger.exception("capture: unreadable write-ahead segment %s set aside", path)
                path.rename(path.with_suffix(".corrupt"))
                continue
            self.closed.append(path)
        return out

    def write(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Append one record; an error is logged and counted (the rows are still buffered and written)."""
        try:
            if self._file is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._path = self.dir / f"{time.time_ns():020d}-{self._id}.wal"
                self._file = open(self._path, "ab")  # noqa: SIM115 (kept open across calls; closed by rotate)
            line = json.dumps({"table": table, "rows": rows}, ensure_ascii=True, default=_wal_default)
            self._file.write(line.encode("ascii") + b"\n")
            self._file.flush()
        except Exception:
            self.errors += 1
            logger.exception("capture: cannot write ahead under %s; %d rows are only in memory", self.dir, len(rows))

    def rotate(self) -> list[Path]:
        """Close the open segment; returns every closed segment (each removable once its rows are stored)."""
        if self._file is not None:
            self._file.close()
            assert self._path is not None
            self.closed.append(self._path)
            self._file, self._path = None, None
        return list(self.closed)

    def remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
            if path in self.closed:  # two flushes at once may both list it
                self.closed.remove(path)


def default_journal_dir(home: str | None = None) -> str:
    """``<dir>/capture-journal`` on the writer's node: ``dir`` is ``$RAYLOOP_NODE_DIR`` where the node sets
    it, else ``home`` or ``$RAYLOOP_HOME`` if that is an absolute path; else
    ``<temp dir>/rayloop-capture-journal``. Resolved in the writer process, on its own node.

    A relative home is not used: it would resolve against the writer process's working directory, which
    under Ray is not the one the user started from.
    """
    home = os.environ.get(NODE_DIR_ENV) or home or os.environ.get("RAYLOOP_HOME")
    if home and Path(home).expanduser().is_absolute():
        return str(Path(home).expanduser() / "capture-journal")
    return os.path.join(tempfile.gettempdir(), "rayloop-capture-journal")


class CaptureWriter:
    """Buffers rows per table and partition; writes Parquet files in batches (a Ray actor).

    ``storage_root`` may be a :class:`~rayloop.storage.Storage` (tests pass one that fails on purpose).
    Keyword arguments default to the ``serving.capture_*`` settings' defaults; ``journal_dir`` to
    :func:`default_journal_dir`, with a subdirectory per storage root.
    """

    def __init__(
        self,
        storage_root: str | Storage,
        s3_endpoint: str | None,
        batch_rows: int,
        flush_s: float,
        max_buffer: int,
        *,
        batch_bytes: int | None = None,
        max_buffer_bytes: int | None = None,
        write_attempts: int | None = None,
        retry_base_s: float | None = None,
        retry_max_s: float | None = None,
        journal_dir: str | None = None,
        journal_max_bytes: int | None = None,
        scrub_pii: bool = False,
        home: str | None = None,
    ) -> None:
        if isinstance(storage_root, Storage):
            self._storage = storage_root
        else:
            self._storage = Storage(storage_root, s3_endpoint=s3_endpoint)
        self._batch_rows = batch_rows
        self._flush_s = flush_s
        self._max_buffer = max_buffer

        def opt(value: Any, name: str) -> Any:
            return _DEFAULTS[name] if value is None else value

        self._batch_bytes = int(opt(batch_bytes, "batch_bytes"))
        self._max_buffer_bytes = int(opt(max_buffer_bytes, "max_buffer_bytes"))
        self._attempts = max(1, int(opt(write_attempts, "write_attempts")))
        self._retry_base_s = float(opt(retry_base_s, "retry_base_s"))
        self._retry_max_s = float(opt(retry_max_s, "retry_max_s"))
        self._journal = _Journal(
            Path(journal_dir or default_journal_dir(home)).expanduser().absolute() / writer_name(self._storage.uri),
            int(opt(journal_max_bytes, "journal_max_bytes")),
        )
        self._buffers: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
        self._buffer_bytes: collections.Counter[tuple[str, str]] = collections.Counter()
        self._buffered = 0
        self._buffered_bytes = 0
        self._recent: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()
        # Every captured request id, so a feedback for an id never captured is answered without reading
        # storage (a flood of made-up ids must not exhaust the writer). Built from storage in the
        # background when the writer starts; until then lookups scan, two at a time.
        from rbloom import Bloom

        self._ids = Bloom(ID_INDEX_CAPACITY, 0.01)
        self._ids_ready = False
        self._index_task: asyncio.Task[None] | None = None
        self._scans = asyncio.Semaphore(MAX_SCANS)
        self._lookups = collections.Counter[str]()
        self._written = collections.Counter[str]()
        self._dropped = collections.Counter[str]()
        self._sanitised = collections.Counter[str]()
        self._quarantined = collections.Counter[str]()
        self._spilled = collections.Counter[str]()
        self._replayed = collections.Counter[str]()
        self._write_errors = 0
        self._storage_down = False  # set when a write ran out of attempts; the next success clears it
        self._lock = asyncio.Lock()
        self._replay_lock = asyncio.Lock()
        self._replay_task: asyncio.Task[int] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._last_flush = time.monotonic()
        self._scrub_pii = scrub_pii
        self._scrubbed = collections.Counter[str]()
        self._exported: collections.Counter[tuple[str, str]] = collections.Counter()
        self._metric: Any = None
        self._recovered = collections.Counter[str]()
        self._wal = _WriteAhead(self._journal.dir / "wal")
        for table, rows in self._wal.recover():  # what a killed writer on this node had accepted
            _, unplaced, _ = self._buffer(table, rows)
            self._recovered[table] += len(rows) - len(unplaced)  # (only placed rows are logged ahead)
        if self._recovered:
            logger.warning("capture: %s rows recovered from the write-ahead log", dict(self._recovered))

    def _export_metrics(self) -> None:
        """Row counts by table and outcome as ``rayloop_capture_rows_total`` on Ray's Prometheus endpoint."""
        try:
            import ray

            if not ray.is_initialized():
                return  # a writer used outside Ray (unit tests): nothing to export to
            if self._metric is None:
                from ray.util import metrics

                self._metric = metrics.Counter(
                    "rayloop_capture_rows_total",
                    "Captured rows by outcome: written, sanitised, quarantined, spilled, replayed, dropped.",
                    tag_keys=("table", "outcome"),
                )
            for outcome, counts in self._outcomes().items():
                for table, n in counts.items():
                    delta = n - self._exported[(table, outcome)]
                    if delta > 0:
                        self._metric.inc(delta, tags={"table": table, "outcome": outcome})
                        self._exported[(table, outcome)] = n
        except Exception:
            logger.exception("capture: exporting metrics failed")

    def _outcomes(self) -> dict[str, collections.Counter[str]]:
        return {
            "written": self._written,
            "sanitised": self._sanitised,
            "pii_scrubbed": self._scrubbed,
            "quarantined": self._quarantined,
            "spilled": self._spilled,
            "replayed": self._replayed,
            "recovered": self._recovered,
            "dropped": self._dropped,
        }

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._periodic())
        if self._index_task is None:
            self._index_task = asyncio.get_running_loop().create_task(self._build_index())

    async def _build_index(self) -> None:
        """Add every request id already in storage to the id index (ids captured meanwhile are added as they come)."""
        try:
            stored = await asyncio.to_thread(_stored_ids, self._storage)
        except Exception as e:  # lookups keep scanning storage: slower, never wrong
            logger.warning("capture: cannot index stored request ids (%s); feedback lookups will scan", e)
            return
        self._ids.update(stored)
        self._ids_ready = True

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s / 2)
            self._export_metrics()
            if time.monotonic() - self._last_flush >= self._flush_s:
                try:
                    await self.flush()  # also replays the journal
                except Exception:  # keep the loop alive; the next round retries
                    logger.exception("capture flush failed")

    async def append(self, table: str, rows: list[dict[str, Any]]) -> int:
        """Buffer rows; returns how many were dropped because the buffer is full.

        Rows that cannot be placed (not a dict, no usable timestamp or model) are quarantined, not dropped.
        """
        self._ensure_loop()
        dropped = 0
        accepted: list[dict[str, Any]] = []
        bad: list[tuple[Any, str]] = []
        for row in rows:
            if self._buffered + len(accepted) >= self._max_buffer:
                dropped += 1
                continue
            try:
                clean, _, changed = _sanitise_row(row)
                if self._scrub_pii:
                    clean, found = _scrub_text_columns(clean)
                    self._scrubbed[table] += found
            except Exception as e:
                bad.append((row, _reason(e)))
                continue
            if changed:
                self._sanitised[table] += 1
            accepted.append(clean)
        full, unplaced, placed = self._buffer(table, accepted)
        if placed:
            self._wal.write(table, placed)  # on disk before the client hears the rows are taken
        bad.extend(unplaced)
        self._dropped[table] += dropped
        if bad:
            async with self._lock:
                await self._quarantine(table, bad)
        if self._buffered_bytes >= self._max_buffer_bytes:  # many partitions, none full: write them all
            full.extend(sorted(self._buffers, key=lambda k: -self._buffer_bytes[k]))
        for key in dict.fromkeys(full):
            await self._write_key(key)
        self._maybe_replay()
        return dropped

    def _buffer(
        self, table: str, rows: list[dict[str, Any]]
    ) -> tuple[list[tuple[str, str]], list[tuple[Any, str]], list[dict[str, Any]]]:
        """Add sanitised rows to their partitions' buffers; returns (partitions now full, rows with no partition
        and why, the rows buffered)."""
        _, part = _TABLES[table]
        full: list[tuple[str, str]] = []
        bad: list[tuple[Any, str]] = []
        placed: list[dict[str, Any]] = []
        for clean in rows:
            try:
                key = (table, part(clean))
                recent = (
                    (str(clean["request_id"]), (clean["model_name"], int(clean["model_version"])))
                    if table == "interactions"
                    else None
                )
            except Exception as e:
                bad.append((clean, _reason(e)))
                continue
            nbytes = _row_bytes(clean)
            placed.append(clean)
            self._buffers[key].append(clean)
            self._buffer_bytes[key] += nbytes
            self._buffered += 1
            self._buffered_bytes += nbytes
            if len(self._buffers[key]) >= self._batch_rows or self._buffer_bytes[key] >= self._batch_bytes:
                full.append(key)
            if recent is not None:
                self._ids.add(recent[0])
                self._recent[recent[0]] = recent[1]
                if len(self._recent) > RECENT_IDS:
                    self._recent.popitem(last=False)
        return full, bad, placed

    async def _write_key(self, key: tuple[str, str]) -> int:
        """Write one partition's buffer; returns the rows now in storage (not those quarantined or spilled)."""
        async with self._lock:
            rows = self._buffers.pop(key, [])
            self._buffered_bytes -= self._buffer_bytes.pop(key, 0)
            if not rows:
                return 0
            self._buffered -= len(rows)
            table, prefix = key
            schema, _ = _TABLES[table]
            payload, n, bad = await asyncio.to_thread(_encode, schema, rows)
            if bad:
                logger.warning("capture: %d of %d %s rows for %s quarantined", len(bad), len(rows), table, prefix)
                await self._quarantine(table, bad)
            if payload is None:
                return 0
            ok = await self._deliver(table, "parquet", f"{prefix}/part-{uuid.uuid4().hex}.parquet", payload, n)
            return n if ok else 0

    async def _quarantine(self, table: str, bad: list[tuple[Any, str]]) -> None:
        """Each bad row alone, with its reason, to ``quarantine/<table>/date=D/`` (caller holds the lock)."""
        self._quarantined[table] += len(bad)
        by_date: dict[str, list[bytes]] = collections.defaultdict(list)
        for row, reason in bad:
            by_date[_quarantine_date(row)].append(_quarantine_line(table, row, reason))
        for day, lines in by_date.items():
            key = f"{QUARANTINE_DIR}/{table}/date={day}/part-{uuid.uuid4().hex}.jsonl"
            await self._deliver(table, "quarantine", key, b"".join(lines), len(lines))

    async def _deliver(self, table: str, kind: str, key: str, payload: bytes, rows: int) -> bool:
        """Put ``payload`` at ``key`` (retrying); else into the journal; else drop and count. True: stored."""
        if await self._put(key, payload):
            if kind == "parquet":
                self._written[table] += rows
            return True
        header = {"key": key, "table": table, "kind": kind, "rows": rows, "storage": self._storage.uri}
        try:
            kept = await asyncio.to_thread(self._journal.add, header, payload)
        except OSError:
            logger.exception("capture: cannot write the journal under %s", self._journal.dir)
            kept = False
        if kept:
            self._spilled[table] += rows
            logger.warning("capture: storage refused %d %s rows (%s); kept in the journal", rows, table, key)
        else:
            self._dropped[table] += rows
            logger.error(
                "capture: storage refused %d %s rows (%s) and the journal (%s, %d of %d bytes) cannot take them; "
                "rows dropped",
                rows,
                table,
                key,
                self._journal.dir,
                self._journal.bytes,
                self._journal.max_bytes,
            )
        return False

    async def _put(self, key: str, payload: bytes) -> bool:
        """Write ``payload`` at ``key`` with backoff; one attempt only while storage is known to be down."""
        attempts = 1 if self._storage_down else self._attempts
        for i in range(attempts):
            if i:
                delay = min(self._retry_max_s, self._retry_base_s * 2 ** (i - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            try:
                await asyncio.to_thread(self._put_sync, key, payload)
            except Exception as e:
                self._write_errors += 1
                logger.warning("capture: writing %s failed (attempt %d of %d): %s", key, i + 1, attempts, _reason(e))
                continue
            self._storage_down = False
            return True
        self._storage_down = True
        return False

    def _put_sync(self, key: str, payload: bytes) -> None:
        # Under a hidden name, then moved into place: readers never see half a file.
        tmp = f"{posixpath.dirname(key)}/{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            self._storage.write_bytes(tmp, payload)
            self._storage.fs.move(self._storage.path(tmp), self._storage.path(key))
        except BaseException:
            try:
                self._storage.delete(tmp)
            except Exception:
                pass
            raise

    def _maybe_replay(self) -> None:
        """Start replaying the journal in the background when storage looks up (never on the caller's time)."""
        if self._journal.entries and not self._storage_down and (self._replay_task is None or self._replay_task.done()):
            self._replay_task = asyncio.get_running_loop().create_task(self._replay())

    async def _replay(self) -> int:
        """Write journal entries to storage, oldest first, until storage refuses one; returns rows replayed."""
        n = 0
        async with self._replay_lock:
            for path in await asyncio.to_thread(self._journal.paths):
                async with self._lock:
                    try:
                        header, payload = await asyncio.to_thread(self._journal.read, path)
                        table, rows = str(header["table"]), int(header["rows"])
                    except FileNotFoundError:
                        continue
                    except Exception:
                        logger.exception("capture journal: unreadable entry %s set aside", path)
                        await asyncio.to_thread(self._journal.set_aside, path)
                        continue
                    if not await self._put(str(header["key"]), payload):
                        return n  # still down: the next flush tries again
                    await asyncio.to_thread(self._journal.remove, path, header)
                    self._replayed[table] += rows
                    if header.get("kind") == "parquet":
                        self._written[table] += rows
                    n += rows
        if n:
            logger.info("capture: replayed %d journaled rows to storage", n)
        return n

    async def flush(self) -> int:
        """Write every buffered row now, then replay the journal; returns the buffered rows written."""
        self._ensure_loop()
        self._last_flush = time.monotonic()
        sealed = self._wal.rotate()
        n = 0
        for key in list(self._buffers):
            n += await self._write_key(key)
        async with self._lock:
            pass  # a write that took its rows before the rotation has finished too
        # Every row in the sealed segments is now in storage, quarantined, journaled or counted as dropped.
        self._wal.remove(sealed)
        if self._journal.entries:
            await self._replay()
        return n

    async def lookup(self, request_id: str) -> dict[str, Any] | None:
        """``{model_name, model_version}`` of a captured request, or None if it was never captured."""
        self._ensure_loop()
        if hit := self._recent.get(request_id):
            self._lookups["recent"] += 1
            return {"model_name": hit[0], "model_version": hit[1]}
        if self._ids_ready and request_id not in self._ids:
            self._lookups["unknown"] += 1  # never captured: no need to read storage
            return None
        self._lookups["scanned"] += 1
        async with self._scans:
            return await asyncio.to_thread(_scan_for, self._storage, request_id)

    async def stats(self) -> dict[str, Any]:
        """Row counts per table since this writer started, and the journal on this node.

        ``written``: rows in storage (replayed ones included); ``sanitised``: rows whose strings were made
        UTF-8 safe (and written); ``quarantined``: rows set aside with their reason; ``spilled``/``replayed``:
        rows (data or quarantine) into / out of the journal; ``recovered``: rows a killed writer on this node
        had taken, read back from the write-ahead log; ``dropped``: rows lost (a full buffer, or storage down
        with a full journal).
        """
        return {
            "written": dict(self._written),
            "dropped": dict(self._dropped),
            "sanitised": dict(self._sanitised),
            "pii_scrubbed": dict(self._scrubbed),
            "quarantined": dict(self._quarantined),
            "spilled": dict(self._spilled),
            "replayed": dict(self._replayed),
            "recovered": dict(self._recovered),
            "write_ahead_errors": self._wal.errors,
            "buffered": self._buffered,
            "buffered_bytes": self._buffered_bytes,
            "write_errors": self._write_errors,
            "storage_down": self._storage_down,
            "journal": self._journal.describe(),
            "lookups": dict(self._lookups),
            "id_index_ready": self._ids_ready,
        }

    async def wait_indexed(self) -> bool:
        """Wait for the id index to be built (tests, and an operator after a restart); True when it is."""
        self._ensure_loop()
        if self._index_task is not None:
            await asyncio.shield(self._index_task)
        return self._ids_ready


def writer_stats(settings: Settings, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The capture writer's counts for ``settings``' storage (None when no writer runs). Needs a Ray driver."""
    import ray

    try:
        actor = ray.get_actor(writer_name(settings.storage_root), namespace=NAMESPACE)
    except ValueError:
        return None
    stats: Any = ray.get(actor.stats.remote(), timeout=timeout_s)
    return dict(stats)


def _stored_ids(storage: Storage) -> Any:
    """A Bloom filter of every request id in stored interactions (one column read)."""
    from rbloom import Bloom

    out = Bloom(ID_INDEX_CAPACITY, 0.01)
    try:
        dataset = _dataset(storage, INTERACTIONS_DIR, INTERACTION_SCHEMA, _INTERACTION_PARTS)
    except FileNotFoundError:
        return out
    for batch in dataset.to_batches(columns=["request_id"]):
        out.update(batch.column(0).to_pylist())
    return out


def _scan_for(storage: Storage, request_id: str) -> dict[str, Any] | None:
    import pyarrow.compute as pc

    try:
        tbl = _dataset(storage, INTERACTIONS_DIR, INTERACTION_SCHEMA, _INTERACTION_PARTS).to_table(
            columns=["model_name", "model_version"], filter=pc.field("request_id") == request_id
        )
    except FileNotFoundError:
        return None
    if tbl.num_rows == 0:
        return None
    return {"model_name": tbl["model_name"][0].as_py(), "model_version": tbl["model_version"][0].as_py()}


def get_or_create_writer(settings: Settings) -> Any:
    """The shared writer actor for ``settings``' storage root (created on first use, detached)."""
    import ray

    from rayloop.raysession import on_the_head

    s = settings.serving
    return (
        ray.remote(CaptureWriter)
        .options(
            **on_the_head(),
            name=writer_name(settings.storage_root),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=64,
            # A crashed writer comes back (and replays its journal); appends in flight are sent again, so a
            # row may be written twice (at least once: readers count distinct request ids).
            max_restarts=-1,
            max_task_retries=3,
        )
        .remote(
            settings.storage_root,
            settings.storage.s3_endpoint,
            s.capture_batch_rows,
            s.capture_flush_s,
            s.capture_max_buffer,
            batch_bytes=s.capture_batch_bytes,
            max_buffer_bytes=s.capture_max_buffer_bytes,
            write_attempts=s.capture_write_attempts,
            retry_base_s=s.capture_retry_base_s,
            retry_max_s=s.capture_retry_max_s,
            journal_dir=s.capture_journal_dir,  # None: resolved by the writer on its own node
            home=settings.home,
            journal_max_bytes=s.capture_journal_max_bytes,
            scrub_pii=s.capture_scrub_pii,
        )
    )


async def _answer(value: bool) -> bool:
    return value


async def _wait_ack(done: asyncio.Future[bool], timeout_s: float) -> bool:
    try:
        return await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except TimeoutError:
        return False


class CaptureClient:
    """Non-blocking, bounded client side of capture (lives in the ingress replica)."""

    def __init__(
        self,
        writer: Any,
        *,
        batch_rows: int,
        flush_s: float,
        max_buffer: int,
        on_drop: Callable[[str, int], None] | None = None,
        batch_bytes: int | None = None,
        max_buffer_bytes: int | None = None,
        resolve: Callable[[], Any] | None = None,
    ) -> None:
        self._writer = writer
        self._batch_rows = batch_rows
        self._flush_s = flush_s
        self._max_buffer = max_buffer
        self._batch_bytes = _DEFAULTS["batch_bytes"] if batch_bytes is None else batch_bytes
        self._max_buffer_bytes = _DEFAULTS["max_buffer_bytes"] if max_buffer_bytes is None else max_buffer_bytes
        self._on_drop = on_drop
        self._resolve = resolve
        self._pending: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._pending_sizes: collections.deque[int] = collections.deque()  # estimated bytes, one per pending row
        self._pending_bytes = 0
        # Rows handed to the writer but not yet acknowledged: lookups must still find them.
        self._shipping: list[tuple[str, dict[str, Any]]] = []
        # id(row) -> the future :meth:`record_acked` waits on, resolved when the writer has the row.
        self._acks: dict[int, asyncio.Future[bool]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self._closed = False

    @classmethod
    def for_settings(cls, settings: Settings, on_drop: Callable[[str, int], None] | None = None) -> CaptureClient:
        s = settings.serving
        return cls(
            get_or_create_writer(settings),
            batch_rows=s.capture_batch_rows,
            flush_s=s.capture_flush_s,
            max_buffer=s.capture_max_buffer,
            on_drop=on_drop,
            batch_bytes=s.capture_batch_bytes,
            max_buffer_bytes=s.capture_max_buffer_bytes,
            resolve=lambda: get_or_create_writer(settings),
        )

    def record(self, table: str, row: dict[str, Any]) -> bool:
        """Queue one row; False (and counted) if the buffer is full. Never blocks, never raises.

        The row is taken as it is: the writer makes its strings safe and quarantines what still does not fit
        (that work stays off the request's process).
        """
        size = _row_bytes(row)
        if (
            len(self._pending) >= self._max_buffer
            or (self._pending and self._pending_bytes + size > self._max_buffer_bytes)
            or self._closed
        ):
            self._drop(table, 1)
            return False
        self._pending.append((table, row))
        self._pending_sizes.append(size)
        self._pending_bytes += size
        if self._task is None:
            try:
                self._task = asyncio.get_running_loop().create_task(self._run())
            except RuntimeError:  # no loop (sync caller): rows go out on close()
                pass
        if len(self._pending) >= self._batch_rows or self._pending_bytes >= self._batch_bytes:
            self._wake.set()
        return True

    def record_acked(self, table: str, row: dict[str, Any], timeout_s: float) -> Awaitable[bool]:
        """Queue one row (now, as :meth:`record`), ship it at once, and return what waits until the writer
        holds it (in its journal on disk).

        That resolves True once it does; False when the row was dropped (counted) or the writer did not take it
        within ``timeout_s`` (the row stays queued for a later round). Rows recorded while a shipment is in
        flight go together in the next one, so under load one round trip carries many rows.
        """
        if not self.record(table, row):
            return _answer(False)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks[id(row)] = done
        self._wake.set()
        return _wait_ack(done, timeout_s)

    def _settle(self, rows: list[dict[str, Any]], taken: bool) -> None:
        for row in rows:
            done = self._acks.pop(id(row), None)
            if done is not None and not done.done():
                done.set_result(taken)

    def _drop(self, table: str, n: int) -> None:
        self.dropped += n
        if self._on_drop is not None:
            try:
                self._on_drop(table, n)
            except Exception:
                pass

    async def _run(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(self._flush_s, CLIENT_SHIP_S))
            except TimeoutError:
                pass
            self._wake.clear()
            await self._ship()

    async def _ship(self) -> None:
        while self._pending:
            batch: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
            taken: list[tuple[str, dict[str, Any]]] = []
            nbytes = 0
            while self._pending and len(taken) < self._batch_rows * 4 and (not taken or nbytes < self._batch_bytes * 4):
                taken.append(self._pending.popleft())
                size = self._pending_sizes.popleft()
                nbytes += size
                self._pending_bytes -= size
            self._shipping.extend(taken)
            for table, row in taken:
                batch[table].append(row)
            try:
                delivered = await self._send(batch)
            finally:
                sent = {id(t) for t in taken}
                self._shipping = [t for t in self._shipping if id(t) not in sent]
            if not delivered:
                return  # the writer is away: the kept rows go with the next round, not in a tight loop

    async def _send(self, batch: dict[str, list[dict[str, Any]]]) -> bool:
        """Hand ``batch`` to the writer; False when some rows were kept back for a later round."""
        delivered = True
        for table, rows in batch.items():
            try:
                dropped = await asyncio.wait_for(self._writer.append.remote(table, rows), timeout=30)
            except Exception as e:  # writer restarting, gone or slow: keep the rows for the next round
                logger.warning("capture: writer unavailable (%s); %d %s rows kept", type(e).__name__, len(rows), table)
                self._reresolve()
                self._requeue(table, rows)
                delivered = False
                continue
            if dropped:
                self._drop(table, int(dropped))
            # The writer says how many it dropped, not which: a row it kept is acknowledged only when it kept
            # them all.
            self._settle(rows, taken=not dropped)
        return delivered

    def _reresolve(self) -> None:
        """Look the writer up again (a writer that exhausted its restarts is created anew)."""
        if self._resolve is None:
            return
        try:
            self._writer = self._resolve()
        except Exception as e:
            logger.warning("capture: cannot resolve the writer (%s)", type(e).__name__)

    def _requeue(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Put unsent rows back in front of the queue, within the buffer bounds; what does not fit is counted."""
        kept = 0
        for row in reversed(rows):
            size = _row_bytes(row)
            if len(self._pending) >= self._max_buffer or self._pending_bytes + size > self._max_buffer_bytes:
                break
            self._pending.appendleft((table, row))
            self._pending_sizes.appendleft(size)
            self._pending_bytes += size
            kept += 1
        if kept < len(rows):
            self._drop(table, len(rows) - kept)
            self._settle(rows[: len(rows) - kept], taken=False)

    async def close(self) -> None:
        """Ship what is queued and make the writer write everything (graceful shutdown)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        await self._ship()
        if self._pending:  # the writer stayed away: these rows are lost, and counted
            lost = collections.Counter(table for table, _ in self._pending)
            self._settle([row for _, row in self._pending], taken=False)
            self._pending.clear()
            self._pending_sizes.clear()
            self._pending_bytes = 0
            for table, n in lost.items():
                logger.warning("capture: %d %s rows lost at shutdown (writer unavailable)", n, table)
                self._drop(table, n)
        try:
            await asyncio.wait_for(self._writer.flush.remote(), timeout=60)
        except Exception as e:
            logger.warning("capture: final flush failed (%s)", e)

    async def flush(self, *, peers: bool = False) -> None:
        """Ship queued rows and have the writer write them now (tests, and before reading back).

        ``peers``: other clients (other replicas of the deployment) may hold rows too. Each ships what
        it has at least every ``flush_s``, so the writer writes after that long: every row recorded
        anywhere before this call is then on disk.
        """
        await self._ship()
        if peers:
            await asyncio.sleep(self._flush_s + 0.5)
        await self._writer.flush.remote()

    async def lookup(self, request_id: str) -> dict[str, Any] | None:
        for table, row in itertools.chain(reversed(self._pending), self._shipping):
            if table == "interactions" and row["request_id"] == request_id:
                return {"model_name": row["model_name"], "model_version": row["model_version"]}
        result: dict[str, Any] | None = await self._writer.lookup.remote(request_id)
        return result


# -- reading back -------------------------------------------------------------
_INTERACTION_PARTS = [("date", "string"), ("model", "string"), ("version", "int64")]
_FEEDBACK_PARTS = [("date", "string")]


def _dataset(storage: Storage, directory: str, schema: pa.Schema, parts: list[tuple[str, str]]) -> Any:
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not storage.exists(directory):
        raise FileNotFoundError(directory)
    part_schema = pa.schema([(n, getattr(pa, t)()) for n, t in parts])
    part = ds.partitioning(part_schema, flavor="hive")
    # An explicit schema: with no file written yet, inference would see only the partition columns.
    full = pa.schema(list(schema) + list(part_schema))
    return ds.dataset(
        storage.path(directory),
        schema=full,
        filesystem=storage.fs,
        format="parquet",
        partitioning=part,
        exclude_invalid_files=True,
        ignore_prefixes=[".", "_"],
    )


def _read(storage: Storage, directory: str, schema: pa.Schema, parts: list[tuple[str, str]], flt: Any) -> pa.Table:
    import pyarrow as pa

    try:
        dset = _dataset(storage, directory, schema, parts)
    except FileNotFoundError:
        return pa.Table.from_pylist([], schema=schema)
    return dset.to_table(filter=flt)


def read_interactions(
    storage: Storage | str, *, model: str | None = None, version: int | None = None, since: str | None = None
) -> pa.Table:
    """Captured interactions (plus the ``date``/``model``/``version`` partition columns).

    ``since`` is a ``YYYY-MM-DD`` date (inclusive).
    """
    import pyarrow.compute as pc

    st = Storage(storage) if isinstance(storage, str) else storage
    flt = None
    for cond in (
        None if model is None else pc.field("model") == model,
        None if version is None else pc.field("version") == version,
        None if since is None else pc.field("date") >= _check_date(since),
    ):
        if cond is not None:
            flt = cond if flt is None else flt & cond
    return _read(st, INTERACTIONS_DIR, INTERACTION_SCHEMA, _INTERACTION_PARTS, flt)


def read_feedback(storage: Storage | str, *, since: str | None = None) -> pa.Table:
    """Feedback rows (plus the ``date`` partition column); join to interactions on ``request_id``."""
    import pyarrow.compute as pc

    st = Storage(storage) if isinstance(storage, str) else storage
    flt = None if since is None else pc.field("date") >= _check_date(since)
    return _read(st, FEEDBACK_DIR, FEEDBACK_SCHEMA, _FEEDBACK_PARTS, flt)


def _check_date(value: str) -> str:
    try:
        datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise DataError(f"date {value!r} is not YYYY-MM-DD", hint="Pass e.g. since='2025-01-31'.") from None
    return value
