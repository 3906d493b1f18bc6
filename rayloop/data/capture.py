"""Interaction capture: rows from the serving path to Parquet, without slowing it down.

Three pieces:

- :class:`CaptureWriter`: one Ray actor per storage root (named, detached, so
  every ingress replica and every app share it and feedback can find any
  request id). It buffers rows per table and writes one Parquet file per
  partition and batch (``capture_batch_rows`` rows, or every
  ``capture_flush_s``), under the layout of :mod:`rayloop.data.schema`.
- :class:`CaptureClient`: what a replica holds. ``record()`` only appends to a
  bounded local buffer (a full buffer drops the row and counts it); a
  background task ships batches to the writer. A request never waits for
  storage and never fails because of it. ``close()`` flushes both ends.
- :func:`read_interactions` / :func:`read_feedback`: ``pyarrow.dataset``
  readers for tests and the data team.

    >>> # inside a Serve replica
    >>> # client = CaptureClient.for_settings(settings); client.record("interactions", row)
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rayloop.config import Settings
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


def _date(row: dict[str, Any]) -> str:
    ts = row["timestamp"]
    return (ts if isinstance(ts, datetime) else datetime.fromtimestamp(float(ts), UTC)).strftime("%Y-%m-%d")


_TABLES: dict[str, tuple[Any, Callable[[dict[str, Any]], str]]] = {
    "interactions": (
        INTERACTION_SCHEMA,
        lambda r: interaction_partition(_date(r), r["model_name"], int(r["model_version"])),
    ),
    "feedback": (FEEDBACK_SCHEMA, lambda r: feedback_partition(_date(r))),
    "shadow": (SHADOW_SCHEMA, lambda r: shadow_partition(_date(r), r["model_name"])),
}


def writer_name(storage_root: str) -> str:
    """One writer per storage root: tests with different roots never share one."""
    return "rayloop-capture-" + hashlib.sha256(storage_root.encode()).hexdigest()[:12]


def utcnow() -> datetime:
    return datetime.now(UTC)


class CaptureWriter:
    """Buffers rows per table and partition; writes Parquet files in batches (a Ray actor)."""

    def __init__(
        self, storage_root: str, s3_endpoint: str | None, batch_rows: int, flush_s: float, max_buffer: int
    ) -> None:
        self._storage = Storage(storage_root, s3_endpoint=s3_endpoint)
        self._batch_rows = batch_rows
        self._flush_s = flush_s
        self._max_buffer = max_buffer
        self._buffers: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
        self._buffered = 0
        self._recent: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()
        self._written = collections.Counter[str]()
        self._dropped = collections.Counter[str]()
        self._lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._last_flush = time.monotonic()

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._periodic())

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s / 2)
            if time.monotonic() - self._last_flush >= self._flush_s:
                try:
                    await self.flush()
                except Exception:  # keep the loop alive; the next round retries
                    logger.exception("capture flush failed")

    async def append(self, table: str, rows: list[dict[str, Any]]) -> int:
        """Buffer rows; returns how many were dropped because the buffer is full."""
        self._ensure_loop()
        _, part = _TABLES[table]
        dropped = 0
        full: list[tuple[str, str]] = []
        for row in rows:
            if self._buffered >= self._max_buffer:
                dropped += 1
                continue
            key = (table, part(row))
            self._buffers[key].append(row)
            self._buffered += 1
            if len(self._buffers[key]) >= self._batch_rows:
                full.append(key)
            if table == "interactions":
                self._recent[row["request_id"]] = (row["model_name"], int(row["model_version"]))
                if len(self._recent) > RECENT_IDS:
                    self._recent.popitem(last=False)
        self._dropped[table] += dropped
        for key in dict.fromkeys(full):
            await self._write_key(key)
        return dropped

    async def _write_key(self, key: tuple[str, str]) -> int:
        async with self._lock:
            rows = self._buffers.pop(key, [])
            if not rows:
                return 0
            self._buffered -= len(rows)
            table, prefix = key
            schema, _ = _TABLES[table]
            try:
                await asyncio.to_thread(self._write_file, schema, prefix, rows)
            except Exception:
                self._dropped[table] += len(rows)
                logger.exception("capture: writing %d %s rows to %s failed; rows dropped", len(rows), table, prefix)
                return 0
            self._written[table] += len(rows)
            return len(rows)

    def _write_file(self, schema: pa.Schema, prefix: str, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tbl = pa.Table.from_pylist(rows, schema=schema)
        key = f"{prefix}/part-{uuid.uuid4().hex}.parquet"
        self._storage.makedirs(prefix)
        # Write under a hidden name, then rename: readers never see half a file.
        tmp = f"{prefix}/.tmp-{uuid.uuid4().hex}.parquet"
        with self._storage.fs.open_output_stream(self._storage.path(tmp)) as f:
            pq.write_table(tbl, f, compression="zstd")
        self._storage.fs.move(self._storage.path(tmp), self._storage.path(key))

    async def flush(self) -> int:
        """Write every buffered row now; returns the number written."""
        self._ensure_loop()
        self._last_flush = time.monotonic()
        n = 0
        for key in list(self._buffers):
            n += await self._write_key(key)
        return n

    async def lookup(self, request_id: str) -> dict[str, Any] | None:
        """``{model_name, model_version}`` of a captured request, or None if it was never captured."""
        if hit := self._recent.get(request_id):
            return {"model_name": hit[0], "model_version": hit[1]}
        return await asyncio.to_thread(_scan_for, self._storage, request_id)

    async def stats(self) -> dict[str, Any]:
        return {"written": dict(self._written), "dropped": dict(self._dropped), "buffered": self._buffered}


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

    s = settings.serving
    return (
        ray.remote(CaptureWriter)
        .options(
            name=writer_name(settings.storage_root),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=64,
        )
        .remote(
            settings.storage_root,
            settings.storage.s3_endpoint,
            s.capture_batch_rows,
            s.capture_flush_s,
            s.capture_max_buffer,
        )
    )


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
    ) -> None:
        self._writer = writer
        self._batch_rows = batch_rows
        self._flush_s = flush_s
        self._max_buffer = max_buffer
        self._on_drop = on_drop
        self._pending: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        # Rows handed to the writer but not yet acknowledged: lookups must still find them.
        self._shipping: list[tuple[str, dict[str, Any]]] = []
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
        )

    def record(self, table: str, row: dict[str, Any]) -> bool:
        """Queue one row; False (and counted) if the buffer is full. Never blocks, never raises."""
        if len(self._pending) >= self._max_buffer or self._closed:
            self._drop(table, 1)
            return False
        self._pending.append((table, row))
        if self._task is None:
            try:
                self._task = asyncio.get_running_loop().create_task(self._run())
            except RuntimeError:  # no loop (sync caller): rows go out on close()
                pass
        if len(self._pending) >= self._batch_rows:
            self._wake.set()
        return True

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
                await asyncio.wait_for(self._wake.wait(), timeout=self._flush_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._ship()

    async def _ship(self) -> None:
        while self._pending:
            batch: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
            taken = [self._pending.popleft() for _ in range(min(len(self._pending), self._batch_rows * 4))]
            self._shipping.extend(taken)
            for table, row in taken:
                batch[table].append(row)
            try:
                await self._send(batch)
            finally:
                sent = {id(t) for t in taken}
                self._shipping = [t for t in self._shipping if id(t) not in sent]

    async def _send(self, batch: dict[str, list[dict[str, Any]]]) -> None:
        for table, rows in batch.items():
            try:
                dropped = await asyncio.wait_for(self._writer.append.remote(table, rows), timeout=30)
            except Exception as e:  # writer gone or slow: drop, count, carry on serving
                logger.warning("capture: %d %s rows dropped (%s)", len(rows), table, type(e).__name__)
                dropped = len(rows)
            if dropped:
                self._drop(table, int(dropped))

    async def close(self) -> None:
        """Ship what is queued and make the writer write everything (graceful shutdown)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        await self._ship()
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
