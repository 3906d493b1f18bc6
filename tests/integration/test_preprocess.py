"""Ray Data preprocessing on generated interactions with known feedback: exact counts per step."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rayloop.config import Settings, load_settings
from rayloop.data.preprocess import preprocess
from rayloop.data.replay import ReplaySource
from rayloop.data.snapshot import read_pairs, storage_of
from rayloop.demo.synthetic import simulate, write_rows
from rayloop.demo.world import World
from rayloop.errors import DataError, EmptyDatasetError

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _row(rid: str, question: str, completion: str, *, status: str = "ok", ts: datetime = T0) -> dict[str, Any]:
    inter, _ = simulate(World.build(), 1)
    r = inter[0]
    r.update(
        request_id=rid,
        timestamp=ts,
        messages=json.dumps([{"role": "user", "content": question}]),
        completion=completion,
        status=status,
    )
    return r


def _fb(rid: str, rating: int | None, correction: str | None = None, ts: datetime = T0) -> dict[str, Any]:
    return {
        "request_id": rid,
        "timestamp": ts + timedelta(seconds=5),
        "rating": rating,
        "correction": correction,
        "user_id": "u",
        "model_name": "demo",
        "model_version": 1,
    }


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """300 simulated interactions + hand-made edge cases, with the labels we expect."""
    home = tmp_path_factory.mktemp("pre-home")
    settings = load_settings(env={"RAYLOOP_HOME": str(home)})
    world = World.build()
    inter, fb = simulate(world, 300, start=T0, feedback_share=0.9, covering=True)
    extra_i = [
        _row("x-unrated", "Who rules Nowhere?", "Nobody."),
        _row("x-neg", "What is the capital of Nowhere?", "Bad."),
        _row("x-err", "Crash?", "", status="error"),
        _row("x-pii", "Mail bob@example.com or call +1 (555) 123-4567: who rules Kelm?", "Kelm is ruled by Dor."),
        _row("x-dup1", "Who rules   Kelm?", "Kelm is ruled by Dor."),
        _row("x-dup2", "who rules kelm?", "Kelm is ruled by  Dor."),
        _row("x-late", "Who rules Kelm today?", "Kelm is ruled by Dor.", ts=T0 + timedelta(days=3)),
    ]
    extra_f = [
        _fb("x-neg", -1),
        _fb("x-err", 1),
        _fb("x-pii", 1),
        _fb("x-dup1", 1),
        _fb("x-dup2", 1),
        _fb("x-late", 1, ts=T0 + timedelta(days=3)),  # feedback comes after its interaction
        _fb("x-orphan", 1),
        _fb("x-unrated", None, None),  # a feedback row with neither rating nor correction: still unrated
    ]
    inter += extra_i
    fb += extra_f
    st = storage_of(settings)
    write_rows(st, inter, fb, rows_per_file=100)
    # A truncated file in the interaction store: skipped and named, not fatal.
    st.write_bytes("interactions/date=2026-03-01/model=demo/version=1/part-broken.parquet", b"PAR1 not really")

    # Expected labels, computed independently of the pipeline.
    last: dict[str, dict[str, Any]] = {}
    for f in sorted(fb, key=lambda f: f["timestamp"]):
        cur = last.setdefault(f["request_id"], {"rating": None, "correction": None})
        if f["rating"] is not None:
            cur["rating"] = f["rating"]
        if f["correction"]:
            cur["correction"] = f["correction"]
    labels: dict[str, str] = {}
    kept: dict[str, tuple[str, str]] = {}
    for r in inter:
        f = last.get(r["request_id"], {"rating": None, "correction": None})
        q = json.loads(r["messages"])[0]["content"]
        if r["status"] != "ok":
            labels[r["request_id"]] = "error"
        elif f["correction"]:
            labels[r["request_id"]], kept[r["request_id"]] = "corrected", (q, f["correction"])
        elif f["rating"] is None:
            labels[r["request_id"]] = "unrated_dropped"
        elif f["rating"] >= 1:
            labels[r["request_id"]], kept[r["request_id"]] = "positive", (q, r["completion"])
        else:
            labels[r["request_id"]] = "negative"
    return {"settings": settings, "world": world, "inter": inter, "labels": labels, "kept": kept, "home": home}


def test_counts_dedupe_pii_split_and_id(store: dict[str, Any], base_model_dir: Path, ray_cluster: object) -> None:
    settings: Settings = store["settings"]
    replay = ReplaySource.from_model_dir(base_model_dir)
    info = preprocess(settings, model_dir=base_model_dir, replay=replay)
    c = info.counts
    want = Counter(store["labels"].values())
    for label in ("corrected", "positive", "negative", "error", "unrated_dropped"):
        assert c[f"label_{label}"] == want[label], label
    assert c["label_orphan_feedback"] == 1
    assert c["requests"] == len(store["inter"])
    assert c["selected"] == len(store["kept"])
    assert c["corrupt_files_skipped"] == 1
    assert info.manifest["skipped_corrupt_files"][0]["path"].endswith("part-broken.parquet")

    # Dedupe on normalised prompt + response (PII placeholders applied first).
    from rayloop.data.pii import scrub

    uniq = {(_norm(scrub(q)[0]), _norm(a)) for q, a in store["kept"].values()}
    assert c["after_dedupe"] == len(uniq)
    assert c["duplicates_removed"] == len(store["kept"]) - len(uniq)
    assert info.manifest["pii_removed"] == {"email": 1, "phone": 1, "secret": 0, "rows": 1}
    pairs = read_pairs(settings, info.snapshot_id, "train") + read_pairs(settings, info.snapshot_id, "eval")
    assert not any("bob@example.com" in p["question"] for p in pairs)
    assert any("<email>" in p["question"] for p in pairs)

    # Replay: data.replay_ratio parent rows per new train row, only on the train side.
    assert c["train_new_rows"] > 0
    assert c["replay_rows"] == round(settings.data.replay_ratio * c["train_new_rows"])
    assert info.manifest["replay"]["requested"] == c["replay_rows"]
    assert c["train_pairs"] == c["train_new_rows"] + c["replay_rows"]
    assert c["eval_pairs"] == c["eval_rows"]
    assert info.manifest["replay"]["kind"] == "pairs"
    assert info.manifest["tokenizer"]["fingerprint"]
    assert c["train_blocks"] > 0 and c["train_tokens"] > 0

    # Eval questions never appear on the train side (split by prompt hash).
    train_q = {_norm(p["question"]) for p in read_pairs(settings, info.snapshot_id, "train")}
    assert not {_norm(p["question"]) for p in read_pairs(settings, info.snapshot_id, "eval")} & train_q

    # Same input, same id; the second run finds the snapshot.
    again = preprocess(settings, model_dir=base_model_dir, replay=replay)
    assert again.snapshot_id == info.snapshot_id and again.reused

    # --since drops what came before (by partition and by timestamp).
    late = preprocess(settings, model_dir=base_model_dir, since=T0 + timedelta(days=2), replay=None)
    assert late.counts["selected"] == 1 and late.counts["replay_rows"] == 0
    assert late.snapshot_id != info.snapshot_id


def test_unrated_keep_and_empty_inputs(store: dict[str, Any], base_model_dir: Path, ray_cluster: object) -> None:
    from rayloop.config import ExternalData

    keep = store["settings"].model_copy(deep=True)
    keep.data.unrated = "keep"  # type: ignore[assignment]
    # A file of the user's own records beside the captured ones, half a row per captured training row.
    extra = store["home"] / f"extra-{uuid.uuid4().hex[:6]}.jsonl"
    extra.write_text(
        '{"prompt": "What is the capital of Ostrava?", "completion": "The capital of Ostrava is Belin."}\n'
        '{"messages": [{"role": "user", "content": "Who rules Ostrava?"}, '
        '{"role": "assistant", "content": "Ostrava is ruled by Duke Amrel."}]}\n'
    )
    keep.data.external = [ExternalData(path=str(extra), weight=0.5)]
    info = preprocess(keep, model_dir=base_model_dir)
    want = Counter(store["labels"].values())
    assert info.counts["label_unrated"] == want["unrated_dropped"]
    assert info.counts["selected"] == len(store["kept"]) + want["unrated_dropped"]
    assert info.counts["external_rows"] == round(0.5 * info.counts["train_new_rows"]) > 0
    [ext] = info.manifest["external"]
    assert ext["path"] == str(extra) and ext["available"] == 2 and ext["fingerprint"].startswith("pairs:")
    train = read_pairs(keep, info.snapshot_id, "train")
    assert {p["question"] for p in train if p["request_id"].startswith("external-0:")} == {
        "What is the capital of Ostrava?",
        "Who rules Ostrava?",
    }
    assert info.counts["train_pairs"] == info.counts["train_new_rows"] + info.counts["replay_rows"] + ext["used"]

    empty = load_settings(env={"RAYLOOP_HOME": str(store["home"] / f"empty-{uuid.uuid4().hex[:6]}")})
    with pytest.raises(EmptyDatasetError, match="no interactions"):
        preprocess(empty, model_dir=base_model_dir)

    # Only negative feedback: nothing selected, clear error, no snapshot left behind.
    st = storage_of(empty)
    write_rows(st, [_row("n1", "Q?", "A.")], [_fb("n1", -1)])
    with pytest.raises(EmptyDatasetError, match="kept none"):
        preprocess(empty, model_dir=base_model_dir)
    assert not list(st.list("snapshots"))

    # A parent model whose tokenizer cannot format conversations, or none at all: named, nothing written.
    broken = store["home"] / f"no-template-{uuid.uuid4().hex[:6]}"
    shutil.copytree(base_model_dir, broken)
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    cfg = broken / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"chat_template"', '"unused_template"'))
    full = storage_of(store["settings"])
    before = sorted(full.list("snapshots"))
    with pytest.raises(DataError, match="has no chat template"):
        preprocess(store["settings"], model_dir=broken)
    with pytest.raises(DataError, match="does not exist"):
        preprocess(store["settings"], model_dir=broken / "missing")
    assert sorted(full.list("snapshots")) == before
