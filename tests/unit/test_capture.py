"""Capture is at least once: a bad row is quarantined alone, storage errors are retried, spilled to a local
journal and replayed, buffers are bounded in bytes, and readers never see a file being written.

The writer is the plain class (``get_or_create_writer`` applies ``ray.remote`` to it): no Ray here.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayloop.data.capture import CaptureClient, CaptureWriter, read_feedback, read_interactions, utcnow
from rayloop.data.schema import INTERACTION_SCHEMA
from rayloop.data.sources import scan
from rayloop.storage import Storage

pytestmark = pytest.mark.unit


def _chat(rid: str, version: int = 1, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "request_id": rid,
        "timestamp": utcnow(),
        "user_id": "u1",
        "model_name": "demo",
        "model_version": version,
        "endpoint": "chat",
        "messages": json.dumps([{"role": "user", "content": f"question {rid}"}]),
        "completion": "an answer",
        "status": "ok",
    }
    row.update(over)
    return row


def _feedback(rid: str, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "request_id": rid,
        "timestamp": utcnow(),
        "rating": 1,
        "model_name": "demo",
        "model_version": 1,
    }
    row.update(over)
    return row


class _FlakyStorage(Storage):
    """Local storage whose file writes fail (like S3 503s or a full disk) while ``down``, or for the first
    ``fail_first`` writes; ``on_move`` runs just before a file is moved into place."""

    def __init__(self, root: str, *, fail_first: int = 0) -> None:
        super().__init__(root)
        self.down = False
        self.fail_first = fail_first
        self.writes = 0
        self.on_move: Any = None
        real, outer = self.fs, self

        class _FS:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def open_output_stream(self, path: str, *a: Any, **kw: Any) -> Any:
                outer.writes += 1
                if outer.down or outer.writes <= outer.fail_first:
                    raise OSError("injected: storage unavailable")
                return real.open_output_stream(path, *a, **kw)

            def move(self, src: str, dst: str) -> None:
                if outer.on_move is not None:
                    outer.on_move(src, dst)
                real.move(src, dst)

        self.fs = _FS()


def _writer(storage: str | Storage, tmp_path: Path, **kw: Any) -> CaptureWriter:
    args: dict[str, Any] = {"batch_rows": 1000, "flush_s": 600, "max_buffer": 10_000}
    args.update(kw)
    return CaptureWriter(
        storage,
        None,
        args.pop("batch_rows"),
        args.pop("flush_s"),
        args.pop("max_buffer"),
        write_attempts=args.pop("write_attempts", 3),
        retry_base_s=args.pop("retry_base_s", 0.0),
        journal_dir=args.pop("journal_dir", str(tmp_path / "journal")),
        **args,
    )


def _ids(tbl: pa.Table) -> set[str]:
    return set(tbl.column("request_id").to_pylist())


def _quarantined(root: Path, table: str) -> list[dict[str, Any]]:
    st = Storage(str(root))
    keys = [k for k in st.list(f"quarantine/{table}") if k.endswith(".jsonl")]
    assert all("/date=" in k and os.path.basename(k).startswith("part-") for k in keys)
    return [json.loads(line) for k in keys for line in st.read_bytes(k).decode("ascii").splitlines()]


def test_one_bad_row_never_costs_the_others(tmp_path: Path) -> None:
    root = tmp_path / "store"
    good = [_chat(f"g{i}") for i in range(60)]
    # Made safe and written: lone surrogates in a message and a user id, an emoji split into its two halves.
    lone = _chat("lone", messages='[{"role": "user", "content": "hi \ud800"}]', user_id="u\udfff")
    pair = _chat("pair", completion="smile \ud83d\ude00")
    # Cannot be written: quarantined, each alone, with its reason.
    bad_type = _chat("bad-type", prompt_tokens="many")  # fails conversion: the batch falls back to rows
    no_status = _chat("no-status", status=None)  # a required column left empty
    bad_version = _chat("bad-version", model_version="abc")  # no partition to put it in

    async def run() -> dict[str, Any]:
        w = _writer(str(root), tmp_path)
        batch = [*good[:30], lone, bad_type, pair, no_status, bad_version, *good[30:]]
        assert await w.append("interactions", batch) == 0
        await w.append("feedback", [_feedback("g1", correction="fix \ud800", user_id="\udc80")])
        await w.flush()
        return await w.stats()

    stats = asyncio.run(run())
    assert stats["written"] == {"interactions": 62, "feedback": 1}
    assert stats["quarantined"] == {"interactions": 3}
    assert stats["sanitised"] == {"interactions": 2, "feedback": 1}
    assert not any(stats["dropped"].values()) and not stats["spilled"]

    rows = {r["request_id"]: r for r in read_interactions(str(root)).to_pylist()}
    assert set(rows) == {r["request_id"] for r in good} | {"lone", "pair"}
    assert read_interactions(str(root)).num_rows == 62
    # The escape is JSON's own: the message decodes back to what the client sent.
    assert json.loads(rows["lone"]["messages"])[0]["content"] == "hi \ud800"
    assert rows["lone"]["user_id"] == "u\\udfff"
    assert rows["pair"]["completion"] == "smile \U0001f600"
    fb = read_feedback(str(root)).to_pylist()
    assert [(f["request_id"], f["correction"], f["user_id"]) for f in fb] == [("g1", "fix \\ud800", "\\udc80")]

    q = _quarantined(root, "interactions")
    assert sorted(r["row"]["request_id"] for r in q) == ["bad-type", "bad-version", "no-status"]
    reasons = {r["row"]["request_id"]: r["reason"] for r in q}
    assert "status" in reasons["no-status"] and "many" in reasons["bad-type"] and "abc" in reasons["bad-version"]
    assert all(r["table"] == "interactions" and r["quarantined_at"] for r in q)


def test_storage_down_retries_spills_to_journal_and_replays(tmp_path: Path) -> None:
    root = tmp_path / "store"
    st = _FlakyStorage(str(root))
    st.down = True

    async def run() -> None:
        w = _writer(st, tmp_path, batch_rows=4, write_attempts=3)
        # Two full batches of 4, written (and refused) as they fill; 2 rows and a bad one on flush.
        await w.append("interactions", [_chat(f"r{i}") for i in range(4)])
        await w.append("interactions", [_chat(f"r{i}") for i in range(4, 8)])
        await w.append("interactions", [_chat("r8"), _chat("bad", status=None), _chat("r9")])
        await w.append("feedback", [_feedback("r1")])
        await w.flush()
        s = await w.stats()
        assert s["storage_down"] is True
        assert s["spilled"] == {"interactions": 11, "feedback": 1}  # 10 data + 1 quarantine row
        assert s["quarantined"] == {"interactions": 1}
        assert not s["written"] and not any(s["dropped"].values())
        assert s["journal"]["rows"] == 12 and s["journal"]["entries"] == 5 and s["journal"]["bytes"] > 0
        # Backoff on the first refused write (3 attempts), then one attempt for each write while down: the
        # second batch, the quarantine file, the flushed rows, the feedback, the flush's replay probe.
        assert s["write_errors"] == 3 + 5
        assert read_interactions(str(root)).num_rows == 0

        st.down = False  # storage is back: the next flush replays the journal
        await w.flush()
        s = await w.stats()
        assert s["replayed"] == s["spilled"] == {"interactions": 11, "feedback": 1}
        assert s["written"] == {"interactions": 10, "feedback": 1}
        assert s["journal"]["rows"] == s["journal"]["entries"] == s["journal"]["bytes"] == 0
        assert s["storage_down"] is False

    asyncio.run(run())
    assert _ids(read_interactions(str(root))) == {f"r{i}" for i in range(10)}
    assert read_interactions(str(root)).num_rows == 10
    assert _ids(read_feedback(str(root))) == {"r1"}
    assert [r["row"]["request_id"] for r in _quarantined(root, "interactions")] == ["bad"]
    assert not [k for k in Storage(str(root)).list("") if "/.tmp-" in k]
    assert not list((tmp_path / "journal").rglob("*.entry"))


def test_a_transient_storage_error_is_retried_not_spilled(tmp_path: Path) -> None:
    root = tmp_path / "store"
    st = _FlakyStorage(str(root), fail_first=2)

    async def run() -> dict[str, Any]:
        w = _writer(st, tmp_path, write_attempts=3)
        await w.append("interactions", [_chat(f"r{i}") for i in range(5)])
        await w.flush()
        return await w.stats()

    s = asyncio.run(run())
    assert s["written"] == {"interactions": 5} and s["write_errors"] == 2
    assert not s["spilled"] and not any(s["dropped"].values())
    assert read_interactions(str(root)).num_rows == 5


def test_journal_is_bounded_in_bytes_and_only_rows_past_it_are_dropped(tmp_path: Path) -> None:
    async def one_entry_bytes() -> int:
        st = _FlakyStorage(str(tmp_path / "probe"))
        st.down = True
        w = _writer(st, tmp_path, batch_rows=4, write_attempts=1, journal_dir=str(tmp_path / "probe-journal"))
        await w.append("interactions", [_chat(f"p{i}") for i in range(4)])
        return int((await w.stats())["journal"]["bytes"])

    size = asyncio.run(one_entry_bytes())
    root = tmp_path / "store"
    st = _FlakyStorage(str(root))
    st.down = True

    async def run() -> None:
        w = _writer(st, tmp_path, batch_rows=4, write_attempts=1, journal_max_bytes=size + size // 2)
        for b in range(3):  # three full batches of 4: the first fits in the journal, the others do not
            await w.append("interactions", [_chat(f"r{i}") for i in range(4 * b, 4 * b + 4)])
        s = await w.stats()
        assert s["spilled"] == {"interactions": 4} and s["dropped"] == {"interactions": 8}
        assert s["journal"]["bytes"] <= size + size // 2
        st.down = False
        await w.flush()
        s = await w.stats()
        assert s["replayed"] == {"interactions": 4} and s["written"] == {"interactions": 4}

    asyncio.run(run())
    assert _ids(read_interactions(str(root))) == {"r0", "r1", "r2", "r3"}


def test_a_restarted_writer_replays_the_journal_it_finds(tmp_path: Path) -> None:
    root = tmp_path / "store"
    st = _FlakyStorage(str(root))
    st.down = True

    async def crash() -> None:
        w = _writer(st, tmp_path, write_attempts=1)
        await w.append("interactions", [_chat(f"r{i}") for i in range(7)])
        await w.flush()
        assert (await w.stats())["spilled"] == {"interactions": 7}

    async def restart() -> dict[str, Any]:
        w = _writer(str(root), tmp_path)  # same node, same journal directory, storage healthy again
        assert (await w.stats())["journal"]["rows"] == 7
        await w.flush()
        return await w.stats()

    asyncio.run(crash())
    s = asyncio.run(restart())
    assert s["replayed"] == {"interactions": 7} and s["journal"]["entries"] == 0
    assert _ids(read_interactions(str(root))) == {f"r{i}" for i in range(7)}


def test_rows_a_killed_writer_had_taken_are_written_by_the_next_one(tmp_path: Path) -> None:
    """Rows are on the node's disk (write-ahead log) before ``append`` returns: a writer killed before its
    flush loses none of them; once a flush has stored them, a restart does not write them again."""
    root = tmp_path / "store"
    wal = tmp_path / "journal"

    async def killed() -> None:
        w = _writer(str(root), tmp_path)
        await w.append("interactions", [_chat(f"k{i}") for i in range(5)])
        await w.append("feedback", [_feedback("k0")])
        # killed here: nothing flushed, the segment's last record cut short by the crash
        [segment] = list(wal.rglob("*.wal"))
        with open(segment, "ab") as f:
            f.write(b'{"table": "interactions", "rows": [{"request_id": "never-acknowl')

    async def restarted() -> dict[str, Any]:
        w = _writer(str(root), tmp_path)
        s = await w.stats()
        assert s["recovered"] == {"interactions": 5, "feedback": 1} and s["buffered"] == 6
        await w.flush()
        assert not list(wal.rglob("*.wal"))  # stored: the segments are gone
        return await w.stats()

    asyncio.run(killed())
    s = asyncio.run(restarted())
    assert s["written"] == {"interactions": 5, "feedback": 1}
    assert _ids(read_interactions(str(root))) == {f"k{i}" for i in range(5)}
    assert read_feedback(str(root)).column("request_id").to_pylist() == ["k0"]

    async def third() -> dict[str, Any]:
        return await _writer(str(root), tmp_path).stats()

    assert asyncio.run(third())["recovered"] == {}  # nothing recovered twice
    assert read_interactions(str(root)).num_rows == 5


def test_flushes_at_once_keep_the_write_ahead_log_consistent(tmp_path: Path) -> None:
    """The periodic flush and a client's flush may run together: each removes only what it stored."""
    root = tmp_path / "store"

    async def run() -> dict[str, Any]:
        w = _writer(str(root), tmp_path)
        for i in range(3):
            await w.append("interactions", [_chat(f"f{i}-{j}") for j in range(4)])
            await asyncio.gather(w.flush(), w.flush(), w.append("interactions", [_chat(f"g{i}")]))
        await w.flush()
        return await w.stats()

    s = asyncio.run(run())
    assert s["written"] == {"interactions": 15} and s["buffered"] == 0
    assert not list((tmp_path / "journal").rglob("*.wal"))
    assert len(_ids(read_interactions(str(root)))) == 15


def test_buffers_are_bounded_in_bytes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    big = "x" * 3000
    drops: list[int] = []

    async def run() -> None:
        # One partition: written when its bytes pass batch_bytes, far below batch_rows.
        w = _writer(str(root), tmp_path, batch_bytes=10_000, max_buffer_bytes=1 << 30)
        for i in range(4):
            await w.append("interactions", [_chat(f"a{i}", completion=big)])
        s = await w.stats()
        assert s["written"] == {"interactions": 4} and s["buffered"] == 0 and s["buffered_bytes"] == 0
        # Many partitions, none full: all written once the writer holds max_buffer_bytes.
        # (its own journal: the first writer was not flushed, so a writer on its journal would recover its
        # four rows from the write-ahead log and write them again)
        w2 = _writer(
            str(root), tmp_path, batch_bytes=1 << 30, max_buffer_bytes=10_000, journal_dir=str(tmp_path / "j2")
        )
        for v in range(2, 6):
            await w2.append("interactions", [_chat(f"b{v}", version=v, completion=big)])
        s = await w2.stats()
        assert s["written"] == {"interactions": 4} and s["buffered"] == 0
        # The replica's client drops (and counts) rows past its byte bound instead of growing.
        c = CaptureClient(
            object(),
            batch_rows=1000,
            flush_s=600,
            max_buffer=1000,
            on_drop=lambda t, n: drops.append(n),
            batch_bytes=1 << 30,
            max_buffer_bytes=10_000,
        )
        assert [c.record("interactions", _chat(f"c{i}", completion=big)) for i in range(5)] == [True] * 3 + [False] * 2
        assert c.dropped == 2 and sum(drops) == 2

    asyncio.run(run())
    assert read_interactions(str(root)).num_rows == 8


def test_readers_never_see_a_file_being_written(tmp_path: Path) -> None:
    root = tmp_path / "store"
    seen: list[tuple[bool, int, int]] = []

    def readers_now(src: str, dst: str) -> None:  # the file is complete, not yet moved into place
        preprocess_scan = scan(Storage(str(root)), "interactions", ("request_id", "status", "completion"))
        seen.append((os.path.exists(src), read_interactions(str(root)).num_rows, preprocess_scan.rows))

    async def run() -> None:
        w = _writer(str(root), tmp_path)
        peek = _FlakyStorage(str(root))
        peek.on_move = readers_now
        w._storage = peek
        await w.append("interactions", [_chat(f"r{i}") for i in range(5)])
        await w.flush()

    asyncio.run(run())
    assert seen == [(True, 0, 0)]
    assert read_interactions(str(root)).num_rows == 5

    # A file left behind by a writer that died mid-write is never read either. (The preprocessing scan lists
    # ``*.parquet`` only, which is why the writer's temporary names have no such suffix; pyarrow.dataset also
    # skips the hidden ``.``/``_`` names that other tools leave.)
    st = Storage(str(root))
    (part,) = [k for k in st.list("interactions") if k.endswith(".parquet")]
    d = st.path(os.path.dirname(part))
    ghost = pa.Table.from_pylist([_chat("ghost")], schema=INTERACTION_SCHEMA)
    for name in (".tmp-0123abcd", ".tmp-0123abcd.parquet", "_tmp-4567.parquet"):
        pq.write_table(ghost, os.path.join(d, name))
    assert read_interactions(str(root)).num_rows == 5 and "ghost" not in _ids(read_interactions(str(root)))
    pq.write_table(ghost, os.path.join(d, ".tmp-89abcdef"))
    for name in (".tmp-0123abcd.parquet", "_tmp-4567.parquet"):
        os.remove(os.path.join(d, name))
    found = scan(st, "interactions", ("request_id", "status", "completion"))
    assert found.rows == 5 and found.files == [st.path(part)]


class _FlakyWriter:
    """A writer handle whose appends fail ``fail`` times (a writer restarting), then land in ``rows``."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.rows: list[dict[str, Any]] = []
        self.calls = 0
        outer = self

        class _Append:
            async def remote(self, table: str, rows: list[dict[str, Any]]) -> int:
                outer.calls += 1
                if outer.fail > 0:
                    outer.fail -= 1
                    raise ConnectionError("writer restarting")
                outer.rows.extend(rows)
                return 0

        class _Flush:
            async def remote(self) -> int:
                return 0

        self.append = _Append()
        self.flush = _Flush()


def test_client_keeps_rows_while_the_writer_restarts_and_re_resolves_it() -> None:
    first, second = _FlakyWriter(fail=10**6), _FlakyWriter(fail=0)
    resolved: list[int] = []

    def resolve() -> _FlakyWriter:
        resolved.append(1)
        return second

    async def run() -> CaptureClient:
        client = CaptureClient(first, batch_rows=10, flush_s=60, max_buffer=1000, resolve=resolve)
        for i in range(25):
            client.record("interactions", {"request_id": f"r{i}"})
        await client.flush()  # the first writer refuses: rows are kept, the writer is looked up again
        assert client.dropped == 0 and first.calls >= 1 and resolved
        await client.flush()  # the new writer takes them all
        return client

    client = asyncio.run(run())
    assert sorted(r["request_id"] for r in second.rows) == sorted(f"r{i}" for i in range(25))
    assert client.dropped == 0


def test_client_counts_what_it_cannot_deliver_at_shutdown() -> None:
    dead = _FlakyWriter(fail=10**6)

    async def run() -> CaptureClient:
        client = CaptureClient(dead, batch_rows=10, flush_s=60, max_buffer=1000)
        for i in range(7):
            client.record("interactions", {"request_id": f"r{i}"})
        await client.close()
        return client

    assert asyncio.run(run()).dropped == 7


def test_an_acked_row_is_answered_only_once_the_writer_holds_it_and_rows_in_flight_share_a_round_trip() -> None:
    writer = _FlakyWriter(fail=0)

    async def run() -> list[bool]:
        # flush_s is long: without the ack the rows would wait for the next round.
        client = CaptureClient(writer, batch_rows=1000, flush_s=60, max_buffer=1000)
        waits = [client.record_acked("interactions", {"request_id": f"r{i}"}, 10) for i in range(20)]
        assert writer.rows == []  # recorded, not yet shipped: nothing awaited so far
        answers = await asyncio.gather(*waits)
        assert sorted(r["request_id"] for r in writer.rows) == sorted(f"r{i}" for i in range(20))
        return list(answers)

    assert asyncio.run(run()) == [True] * 20
    assert writer.calls == 1  # twenty rows recorded together went in one append


def test_an_acked_row_the_writer_does_not_take_in_time_is_answered_false_and_kept() -> None:
    away, back = _FlakyWriter(fail=10**6), _FlakyWriter(fail=0)

    async def run() -> tuple[bool, CaptureClient]:
        client = CaptureClient(away, batch_rows=1000, flush_s=60, max_buffer=1000, resolve=lambda: back)
        answer = await client.record_acked("interactions", {"request_id": "r0"}, 0.2)
        await client.flush()  # the writer is back: the kept row reaches it
        return answer, client

    answer, client = asyncio.run(run())
    assert answer is False
    assert [r["request_id"] for r in back.rows] == ["r0"] and client.dropped == 0


def test_feedback_for_ids_never_captured_is_answered_without_reading_storage(tmp_path: Path) -> None:
    """A flood of made-up request ids costs an in-memory lookup each, not a scan of every stored file."""
    import uuid

    storage = str(tmp_path / "store")
    real = [uuid.uuid4().hex for _ in range(50)]

    async def first() -> None:
        w = _writer(storage, tmp_path)
        await w.append("interactions", [_chat(rid) for rid in real])
        await w.flush()

    asyncio.run(first())

    async def restarted() -> dict[str, Any]:
        w = _writer(storage, tmp_path)  # a new writer: its recent-id memory is empty, its index comes from storage
        assert await w.wait_indexed()
        unknown = [await w.lookup(uuid.uuid4().hex) for _ in range(2000)]
        assert unknown == [None] * 2000
        found = [await w.lookup(rid) for rid in real[:5]]
        assert all(f == {"model_name": "demo", "model_version": 1} for f in found)
        stats: dict[str, Any] = await w.stats()
        return stats

    lookups = asyncio.run(restarted())["lookups"]
    # Bloom false positives (1%) may cost a few scans; a scan per made-up id would be 2000.
    assert lookups["unknown"] >= 1950 and lookups.get("scanned", 0) <= 5 + 50, lookups


def test_pii_can_be_scrubbed_when_a_row_is_captured(tmp_path: Path) -> None:
    storage = str(tmp_path / "store")

    async def run() -> dict[str, Any]:
        w = _writer(storage, tmp_path, scrub_pii=True)
        msg = json.dumps([{"role": "user", "content": "mail bob@example.com or call +1 (555) 123-4567"}])
        await w.append("interactions", [_chat("r1", messages=msg, completion="sure, bob@example.com"), _chat("r2")])
        await w.append("feedback", [_feedback("r1", correction="write to alice@example.org")])
        await w.flush()
        stats: dict[str, Any] = await w.stats()
        return stats

    stats = asyncio.run(run())
    rows = {r["request_id"]: r for r in read_interactions(storage).to_pylist()}
    assert "bob@example.com" not in rows["r1"]["messages"] and "<email>" in rows["r1"]["messages"]
    assert "<phone>" in rows["r1"]["messages"] and rows["r1"]["completion"] == "sure, <email>"
    assert rows["r2"]["completion"] == "an answer"  # nothing to scrub, kept as it was
    assert read_feedback(storage).to_pylist()[0]["correction"] == "write to <email>"
    assert stats["pii_scrubbed"] == {"interactions": 1, "feedback": 1}
