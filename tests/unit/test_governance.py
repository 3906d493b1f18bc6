"""Retention and forgetting a user, through the commands a user types (`rayloop data prune|forget`)."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rayloop.cli import cli
from rayloop.config import Settings
from rayloop.data.capture import CaptureWriter, read_feedback, read_interactions
from rayloop.data.snapshot import snapshot_key, storage_of
from rayloop.registry import Registry
from rayloop.training.retrain import retrain
from tests.registry_util import make_model_dir

pytestmark = pytest.mark.unit


def _row(rid: str, user: str, day: datetime, text: str = "my secret question") -> dict[str, Any]:
    return {
        "request_id": rid,
        "timestamp": day,
        "user_id": user,
        "model_name": "demo",
        "model_version": 1,
        "endpoint": "chat",
        "messages": json.dumps([{"role": "user", "content": text}]),
        "completion": "an answer",
        "status": "ok",
    }


def _capture(
    settings: Settings, tmp_path: Path, interactions: list[dict[str, Any]], feedback: list[dict[str, Any]]
) -> None:
    async def run() -> None:
        w = CaptureWriter(settings.storage_root, None, 1000, 600, 10_000, journal_dir=str(tmp_path / "journal"))
        await w.append("interactions", interactions)
        await w.append("feedback", feedback)
        await w.flush()

    asyncio.run(run())


def _fb(rid: str, user: str, day: datetime, rating: int = 1) -> dict[str, Any]:
    return {
        "request_id": rid,
        "timestamp": day,
        "rating": rating,
        "user_id": user,
        "model_name": "demo",
        "model_version": 1,
    }


def _snapshot(settings: Settings, sid: str, request_ids: list[str]) -> None:
    """A finished snapshot as preprocessing leaves it: pairs (with request ids), blocks, manifest."""
    st = storage_of(settings)
    pairs = pa.table({"request_id": request_ids, "question": [f"q-{r}" for r in request_ids]})
    blocks = pa.table({"input_ids": [[1, 2, 3]] * len(request_ids)})
    for name, table in (("pairs", pairs), ("blocks", blocks)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        st.write_bytes(snapshot_key(sid, "train", name, "part-0.parquet"), buf.getvalue())
    manifest = {"snapshot_id": sid, "layout": {"train": {"pairs": "train/pairs", "blocks": "train/blocks"}}}
    st.write_bytes(snapshot_key(sid, "manifest.json"), json.dumps(manifest).encode())


def _invoke(*args: str) -> Any:
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0, r.output
    return json.loads(r.output) if "--json" in args else r.output


def test_forget_a_user_removes_their_rows_everywhere_and_marks_what_was_built_from_them(
    settings: Settings, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    _capture(
        settings,
        tmp_path,
        [_row("a1", "alice", now), _row("a2", "alice", now), _row("b1", "bob", now), _row("b2", "bob", now)],
        # alice's own rating, and bob's rating of... nothing of hers; a rating by bob on alice's request goes too
        [_fb("a1", "alice", now), _fb("b1", "bob", now), _fb("a2", "bob", now)],
    )
    _snapshot(settings, "snap-1", ["a1", "b1"])
    _snapshot(settings, "snap-2", ["b2"])
    reg = Registry.from_settings(settings)
    reg.register("demo", make_model_dir(tmp_path / "m1", seed=1))
    reg.register("demo", make_model_dir(tmp_path / "m2", seed=2), parent=1, lineage={"snapshot_id": "snap-1"})

    dry = _invoke("data", "forget", "--user", "alice", "--dry-run", "--json")
    assert dry["requests"] == 2 and dry["rows_removed"]["interactions"] == 2
    assert read_interactions(settings.storage_root).num_rows == 4  # a dry run changes nothing

    out = _invoke("data", "forget", "--user", "alice", "--json")
    assert out["rows_removed"] == {"interactions": 2, "feedback": 2, "snapshot_pairs": 1}
    assert out["snapshots_marked"] == ["snap-1"] and out["versions_marked"] == ["demo@2"]
    assert "alice" not in json.dumps(out)  # the report names a pseudonymous subject, not the user

    assert set(read_interactions(settings.storage_root).column("request_id").to_pylist()) == {"b1", "b2"}
    assert read_feedback(settings.storage_root).column("request_id").to_pylist() == ["b1"]
    st = storage_of(settings)
    manifest = json.loads(st.read_bytes(snapshot_key("snap-1", "manifest.json")))
    assert manifest["trainable"] is False and manifest["forgotten"][0]["pairs_removed"] == 1
    assert not st.exists(snapshot_key("snap-1", "train", "blocks"))  # token ids cannot be traced: gone
    pairs = pq.read_table(st.path(snapshot_key("snap-1", "train", "pairs", "part-0.parquet")))
    assert pairs.column("request_id").to_pylist() == ["b1"]
    assert "trainable" not in json.loads(st.read_bytes(snapshot_key("snap-2", "manifest.json")))
    assert reg.resolve("demo@2").annotations["forgotten_data"][0]["snapshot_id"] == "snap-1"
    # The governance record keeps the fact, not the user id or any text.
    [record] = [k for k in st.list("governance")]
    text = st.read_bytes(record).decode()
    assert "alice" not in text and "secret" not in text and json.loads(text)["kind"] == "forget"

    # A marked snapshot is never trained on again; the error says what to do.
    from rayloop.errors import TrainingError

    with pytest.raises(TrainingError, match="forgotten") as e:
        retrain(settings, snapshot_id="snap-1", base_dir=tmp_path / "m1", output_dir=tmp_path / "out")
    assert "rayloop data preprocess" in (e.value.hint or "")

    again = _invoke("data", "forget", "--user", "alice", "--json")
    assert again["requests"] == 0 and again["rows_removed"] == {}


def test_prune_deletes_partitions_past_the_retention_age(settings: Settings, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=40), now - timedelta(days=3)
    _capture(
        settings,
        tmp_path,
        [_row("old", "u", old), _row("new", "u", recent)],
        [_fb("old", "u", old), _fb("new", "u", recent)],
    )
    r = CliRunner().invoke(cli, ["data", "prune"])
    assert r.exit_code == 1 and "data.retention_days" in r.output  # no age configured: says where to set one

    dry = _invoke("data", "prune", "--older-than", "30", "--dry-run", "--json")
    assert dry["files"] == {"interactions": 1, "feedback": 1}
    assert read_interactions(settings.storage_root).num_rows == 2

    out = _invoke("data", "prune", "--older-than", "30", "--json")
    assert [p.split("/")[1] for p in out["partitions"]["interactions"]] == [f"date={old.date().isoformat()}"]
    assert read_interactions(settings.storage_root).column("request_id").to_pylist() == ["new"]
    assert read_feedback(settings.storage_root).column("request_id").to_pylist() == ["new"]
    assert _invoke("data", "prune", "--older-than", "30", "--json")["partitions"] == {}
