from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from rayloop.config import DataSettings
from rayloop.data.format import IGNORE, pack
from rayloop.data.replay import ReplaySource, sample_pairs
from rayloop.data.snapshot import combine_row_hashes
from rayloop.data.transforms import COMMON_SCHEMA, resolve_request, unit_hash


def _ex(n: int, prompt: int) -> tuple[list[int], list[int]]:
    ids = list(range(1, n + 1))
    return ids, [IGNORE] * prompt + ids[prompt:]


def test_pack_keeps_examples_whole_and_restarts_positions() -> None:
    blocks = pack([_ex(5, 2), _ex(4, 1), _ex(3, 1)], block_size=8, pad_id=0)
    assert len(blocks) == 2
    b0, b1 = blocks
    assert b0["input_ids"] == [1, 2, 3, 4, 5, 0, 0, 0]
    assert b0["attention_mask"] == [1] * 5 + [0] * 3
    assert b0["labels"][:2] == [IGNORE, IGNORE] and b0["labels"][5:] == [IGNORE] * 3
    assert b1["input_ids"] == [1, 2, 3, 4, 1, 2, 3, 0]
    assert b1["position_ids"][:7] == [0, 1, 2, 3, 0, 1, 2]
    assert all(len(v) == 8 for b in blocks for v in b.values())


def test_pack_splits_only_examples_longer_than_a_block() -> None:
    blocks = pack([_ex(3, 1), _ex(10, 2)], block_size=4, pad_id=0)
    assert [sum(b["attention_mask"]) for b in blocks] == [3, 4, 4, 2]
    assert blocks[2]["position_ids"] == [4, 5, 6, 7]


def test_replay_sample_is_deterministic_and_cycles() -> None:
    pairs = [(f"q{i}", f"a{i}") for i in range(5)]
    a = sample_pairs(pairs, 3)
    assert a == sample_pairs(list(reversed(pairs)), 3)
    assert len(sample_pairs(pairs, 12)) == 12
    assert ReplaySource.from_pairs(pairs).fingerprint() == ReplaySource.from_pairs(pairs[::-1]).fingerprint()


def test_row_hash_combination_is_order_independent() -> None:
    hs = ["%032x" % (i * 7919) for i in range(100)]
    assert combine_row_hashes(hs) == combine_row_hashes(reversed(hs))
    assert combine_row_hashes(hs) != combine_row_hashes(hs[:-1])
    assert 0 <= unit_hash("x") < 1


def _group(*rows: dict[str, object]) -> pa.Table:
    base = {f.name: None for f in COMMON_SCHEMA}
    return pa.Table.from_pylist([{**base, "request_id": "r1", **r} for r in rows], schema=COMMON_SCHEMA)


def test_resolve_request_folds_feedback_and_scrubs() -> None:
    from datetime import UTC, datetime

    t = datetime(2026, 1, 1, tzinfo=UTC)
    msgs = '[{"role": "user", "content": "mail me at a@b.io: what is X?"}]'
    g = _group(
        {"kind": "i", "ts": t, "status": "ok", "messages": msgs, "completion": "wrong"},
        {"kind": "f", "ts": t.replace(second=2), "rating": -1, "correction": "X is Y."},
        {"kind": "f", "ts": t.replace(second=3), "rating": -1},
    )
    row = resolve_request(g, DataSettings(), None).to_pylist()[0]
    assert row["label"] == "corrected" and row["response"] == "X is Y."
    assert row["question"] == "mail me at <email>: what is X?" and row["pii_email"] == 1
    assert row["split"] in ("train", "eval")
    orphan = resolve_request(_group({"kind": "f", "ts": t, "rating": 1}), DataSettings(), None).to_pylist()[0]
    assert orphan["label"] == "orphan_feedback"


def test_unshared_blocks_hold_one_example_each() -> None:
    from rayloop.data.format import pack

    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [-100, -100, 8, 9])]
    shared = pack(examples, 8, 0)
    alone = pack(examples, 8, 0, share_blocks=False)
    assert len(shared) == 2
    assert [b["input_ids"] for b in alone] == [
        [1, 2, 3, 0, 0, 0, 0, 0],
        [4, 5, 0, 0, 0, 0, 0, 0],
        [6, 7, 8, 9, 0, 0, 0, 0],
    ]
    assert all(b["position_ids"][0] == 0 for b in alone)
    assert [sum(b["attention_mask"]) for b in alone] == [3, 2, 4]


def test_snapshot_ids_resolve_from_a_unique_prefix(settings: Any) -> None:
    from rayloop.data.snapshot import MANIFEST, resolve_snapshot_id, snapshot_key, storage_of
    from rayloop.errors import DataError, NotFoundError

    st = storage_of(settings)
    for sid in ("3effdb1a01e716e3b3ff", "77b1c1d6f60584560072", "77b1c1ffffffffffffff"):
        st.write_bytes(snapshot_key(sid, MANIFEST), b"{}")
    st.write_bytes(snapshot_key("_staging", "3effdb1a01e7-partial", "x"), b"")
    assert resolve_snapshot_id(settings, "3effdb1a01e716e3b3ff") == "3effdb1a01e716e3b3ff"
    assert resolve_snapshot_id(settings, "3effdb1a01e7") == "3effdb1a01e716e3b3ff"
    with pytest.raises(DataError, match="matches 2 snapshots"):
        resolve_snapshot_id(settings, "77b1c1")
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_snapshot_id(settings, "abc")  # too short to search, and not an id
    with pytest.raises(NotFoundError):
        resolve_snapshot_id(settings, "ffffffff")


def test_tokenizer_ref_pickles_as_a_path_and_tokenizes_like_the_tokenizer(tmp_path: Any) -> None:
    import pickle

    from rayloop.data.format import TokenizerRef, load_tokenizer, tokenizer_facts, tokenizer_fingerprint
    from rayloop.data.transforms import tokenize_rows
    from rayloop.demo.model import train_tokenizer
    from rayloop.demo.world import World
    from rayloop.errors import DataError

    train_tokenizer(World.build(), 640).save_pretrained(str(tmp_path / "m"))
    ref = TokenizerRef(tmp_path / "m", tokenizer_fingerprint(tmp_path / "m"))
    blob = pickle.dumps(ref)
    assert len(blob) < 500  # the path and fingerprint, not the tokenizer
    tok = load_tokenizer(tmp_path / "m")
    rows = pa.table(
        {
            "request_id": ["r1"],
            "split": ["train"],
            "question": ["What is the capital of Avaria?"],
            "messages": ['[{"role": "user", "content": "What is the capital of Avaria?"}]'],
            "response": ["Brel"],
        }
    )
    assert tokenize_rows(rows, pickle.loads(blob), 256, "interaction") == tokenize_rows(rows, tok, 256, "interaction")
    assert pickle.loads(blob).get() is ref.get()  # loaded once per process
    facts = tokenizer_facts(tmp_path / "m")
    assert facts["eos_token"] == tok.eos_token and facts["pad_token_id"] == tok.pad_token_id
    # A tokenizer without a chat template cannot format conversations: named, with what to do.
    cfg = tmp_path / "m" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"chat_template"', '"unused_template"'))
    (tmp_path / "m" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(DataError, match="has no chat template"):
        tokenizer_facts(tmp_path / "m")


def test_map_key_groups_sees_each_key_once_and_returns_one_chunk() -> None:
    from rayloop.data.transforms import map_key_groups

    t = pa.table({"k": ["b", "a", "b", "c", "a", "b"], "v": [1, 2, 3, 4, 5, 6]}).slice(0)
    t = pa.concat_tables([t.slice(0, 3), t.slice(3)])  # two chunks in, as a bucket read from two files
    seen: list[tuple[str, list[int]]] = []

    def fn(g: pa.Table) -> pa.Table:
        seen.append((g["k"][0].as_py(), sorted(g["v"].to_pylist())))
        return pa.table({"k": [g["k"][0].as_py()], "n": [g.num_rows]})

    out = map_key_groups(t, "k", fn)
    assert sorted(seen) == [("a", [2, 5]), ("b", [1, 3, 6]), ("c", [4])]
    assert out.to_pylist() == [{"k": "a", "n": 2}, {"k": "b", "n": 3}, {"k": "c", "n": 1}]
    # One chunk per column: thousands of one-row chunks made every later step slow and memory-hungry.
    assert out["k"].num_chunks == 1
    with pytest.raises(ValueError, match="at least one row"):
        map_key_groups(t.slice(0, 0), "k", fn)


def test_key_buckets_are_stable_and_equal_keys_share_one() -> None:
    from rayloop.data.transforms import add_key_bucket

    keys = [f"req-{i}" for i in range(200)] + ["req-7", None]
    a = add_key_bucket(pa.table({"id": keys}), "id", 7)["bucket"].to_pylist()
    b = add_key_bucket(pa.table({"id": list(reversed(keys))}), "id", 7)["bucket"].to_pylist()[::-1]
    assert a == b and a[7] == a[200] and set(a) == set(range(7))


def test_dedupe_bucket_keeps_the_smallest_request_id_of_each_kept_key() -> None:
    from rayloop.data.policy import KEPT_LABELS
    from rayloop.data.transforms import LABELED_SCHEMA, dedupe_bucket

    def row(rid: str, label: str, key: str | None) -> dict[str, Any]:
        r: dict[str, Any] = dict.fromkeys(LABELED_SCHEMA.names)
        r.update({n: 0 for n in LABELED_SCHEMA.names if n.startswith("pii_")})
        r.update(request_id=rid, label=label, dedupe_key=key)
        return r

    t = pa.Table.from_pylist(
        [
            row("r3", "positive", "k1"),
            row("r1", "corrected", "k1"),
            row("r2", "negative", None),
            row("r4", "unrated", "k2"),
        ],
        schema=LABELED_SCHEMA,
    )
    out = dedupe_bucket(t, KEPT_LABELS)
    assert sorted(out["request_id"].to_pylist()) == ["r1", "r4"]  # r3 duplicates r1; r2 was dropped by the policy


def test_a_shipped_tokenizer_loads_on_a_node_without_the_model_directory(tmp_path: Any, monkeypatch: Any) -> None:
    """Ray Data's tokenizing tasks on other nodes: the files come from the object store (here: the plain
    dict Ray would hand back), are written once under the node's directory, and tokenize the same."""
    import pickle
    import shutil

    import ray

    from rayloop.data.format import TokenizerRef, load_tokenizer, tokenizer_fingerprint
    from rayloop.demo.model import train_tokenizer
    from rayloop.demo.world import World

    monkeypatch.setattr(ray, "put", lambda value: value)
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setenv("RAYLOOP_NODE_DIR", str(tmp_path / "node"))
    train_tokenizer(World.build(), 640).save_pretrained(str(tmp_path / "m"))
    want = load_tokenizer(tmp_path / "m")("What is the capital of Avaria?")["input_ids"]
    ref = TokenizerRef(tmp_path / "m", tokenizer_fingerprint(tmp_path / "m")).shipped()
    assert ref.local_dir() == str(tmp_path / "m")  # where the directory is there, it is used
    shutil.rmtree(tmp_path / "m")  # a node that has no copy of it
    elsewhere = pickle.loads(pickle.dumps(ref))
    assert elsewhere.local_dir() == str(tmp_path / "node" / "tokenizers" / ref.fingerprint)
    assert elsewhere.get()("What is the capital of Avaria?")["input_ids"] == want
    assert tokenizer_fingerprint(elsewhere.local_dir()) == ref.fingerprint
