"""The per-batch and per-group functions of the preprocessing pipeline.

They take and return ``pyarrow.Table`` so Ray Data can run them in tasks
without pandas conversions. Dropped rows are not removed at the first stage:
they carry a ``label`` saying why, so every step's row count is exact (read
back from the staged Parquet) instead of estimated.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Any

import pyarrow as pa

from rayloop.config import DataSettings
from rayloop.data.format import encode_example, last_user_message, messages_of, pack
from rayloop.data.pii import PII_KINDS, scrub
from rayloop.data.policy import decide
from rayloop.data.snapshot import row_hash

# Interactions and feedback are unioned into this one schema, then grouped by
# request id: a single shuffle joins them and folds repeated feedback.
COMMON_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("kind", pa.string()),  # "i" interaction, "f" feedback
        ("ts", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),
        ("messages", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("choices", pa.string()),  # JSON list of every choice's text when there were several
        ("rating", pa.int8()),
        ("correction", pa.string()),
    ]
)

LABELED_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("question", pa.string()),
        ("messages", pa.string()),
        ("response", pa.string()),
        ("dedupe_key", pa.string()),
        *[(f"pii_{k}", pa.int32()) for k in PII_KINDS],
    ]
)

TOKENIZED_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("question", pa.string()),
        ("messages", pa.string()),
        ("response", pa.string()),
        ("n_tokens", pa.int32()),
        ("too_long", pa.bool_()),
        ("row_hash", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
    ]
)

BLOCKS_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("attention_mask", pa.list_(pa.int8())),
        ("position_ids", pa.list_(pa.int32())),
    ]
)


def _col(t: pa.Table, name: str, typ: pa.DataType) -> pa.Array | pa.ChunkedArray:
    if name in t.column_names:
        return t[name].cast(typ)
    return pa.nulls(t.num_rows, typ)


def interactions_to_common(t: pa.Table) -> pa.Table:
    return pa.table(
        {
            "request_id": t["request_id"].cast(pa.string()),
            "kind": pa.array(["i"] * t.num_rows, pa.string()),
            "ts": _col(t, "timestamp", COMMON_SCHEMA.field("ts").type),
            "status": _col(t, "status", pa.string()),
            "messages": _col(t, "messages", pa.string()),
            "prompt": _col(t, "prompt", pa.string()),
            "completion": _col(t, "completion", pa.string()),
            "choices": _col(t, "choices", pa.string()),
            "rating": pa.nulls(t.num_rows, pa.int8()),
            "correction": pa.nulls(t.num_rows, pa.string()),
        },
        schema=COMMON_SCHEMA,
    )


def feedback_to_common(t: pa.Table) -> pa.Table:
    return pa.table(
        {
            "request_id": t["request_id"].cast(pa.string()),
            "kind": pa.array(["f"] * t.num_rows, pa.string()),
            "ts": _col(t, "timestamp", COMMON_SCHEMA.field("ts").type),
            "status": pa.nulls(t.num_rows, pa.string()),
            "messages": pa.nulls(t.num_rows, pa.string()),
            "prompt": pa.nulls(t.num_rows, pa.string()),
            "completion": pa.nulls(t.num_rows, pa.string()),
            "choices": pa.nulls(t.num_rows, pa.string()),
            "rating": _col(t, "rating", pa.int8()),
            "correction": _col(t, "correction", pa.string()),
        },
        schema=COMMON_SCHEMA,
    )


_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a string (the split and sampling decisions)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / float(1 << 64)


def _labeled_row(rid: str, label: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {f.name: None for f in LABELED_SCHEMA}
    row.update({f"pii_{k}": 0 for k in PII_KINDS})
    row.update(request_id=rid, label=label, **kw)
    return row


def resolve_request(group: pa.Table, settings: DataSettings, since: datetime | None) -> pa.Table:
    """One request id: its interaction and all feedback on it -> one labeled row."""
    rows = sorted(group.to_pylist(), key=lambda r: (r["ts"] is None, r["ts"]))
    inter = [r for r in rows if r["kind"] == "i"]
    fb = [r for r in rows if r["kind"] == "f"]
    rid = rows[0]["request_id"]
    if not inter:
        return pa.Table.from_pylist([_labeled_row(rid, "orphan_feedback")], schema=LABELED_SCHEMA)
    it = inter[0]  # a retried capture may write the same request twice: keep the first
    if since is not None and it["ts"] is not None and it["ts"] < since:
        return pa.Table.from_pylist([_labeled_row(rid, "before_since")], schema=LABELED_SCHEMA)
    # Latest feedback wins; a correction outranks a later bare rating.
    corrections = [r["correction"] for r in fb if r["correction"] and r["correction"].strip()]
    ratings = [r["rating"] for r in fb if r["rating"] is not None]
    response, label = decide(
        settings,
        status=it["status"],
        completion=it["completion"],
        rating=ratings[-1] if ratings else None,
        correction=corrections[-1] if corrections else None,
        n_choices=len(json.loads(it["choices"])) if it.get("choices") else 1,
    )
    if response is None:
        return pa.Table.from_pylist([_labeled_row(rid, label)], schema=LABELED_SCHEMA)
    msgs = messages_of(it["messages"], it["prompt"])
    if not msgs or not any(m["content"].strip() for m in msgs):
        return pa.Table.from_pylist([_labeled_row(rid, "empty")], schema=LABELED_SCHEMA)

    pii = dict.fromkeys(PII_KINDS, 0)

    def clean(text: str) -> str:
        out, counts = scrub(text)
        for k, v in counts.items():
            pii[k] += v
        return out

    msgs = [{"role": m["role"], "content": clean(m["content"])} for m in msgs]
    response = clean(response)
    messages_json = json.dumps(msgs, ensure_ascii=False, sort_keys=True)
    prompt_norm = normalise(" ".join(f"{m['role']}:{m['content']}" for m in msgs))
    # The split hashes the request's prompt: every copy of a question lands on
    # the same side, so the eval split never asks what training saw.
    split = "eval" if unit_hash("split\0" + prompt_norm) < settings.eval_fraction else "train"
    row = _labeled_row(
        rid,
        label,
        split=split,
        question=last_user_message(msgs),
        messages=messages_json,
        response=response,
        dedupe_key=hashlib.sha256(f"{prompt_norm}\0{normalise(response)}".encode()).hexdigest()[:32],
        **{f"pii_{k}": v for k, v in pii.items()},
    )
    return pa.Table.from_pylist([row], schema=LABELED_SCHEMA)


def first_of_duplicates(group: pa.Table) -> pa.Table:
    """Deterministic dedupe: keep the row with the smallest request id."""
    import pyarrow.compute as pc

    idx = pc.sort_indices(group, sort_keys=[("request_id", "ascending")])[0].as_py()
    return group.slice(idx, 1)


def tokenize_rows(t: pa.Table, tok: Any, max_tokens: int, source: str) -> pa.Table:
    """Tokenize with ``tok``: a tokenizer, or a :class:`~rayloop.data.format.TokenizerRef` loaded here."""
    from rayloop.data.format import TokenizerRef

    if isinstance(tok, TokenizerRef):
        tok = tok.get()
    out: dict[str, list[Any]] = {f.name: [] for f in TOKENIZED_SCHEMA}
    for r in t.to_pylist():
        msgs = json.loads(r["messages"])
        ids, labels = encode_example(tok, msgs, r["response"])
        split = r.get("split") or "train"
        out["request_id"].append(r["request_id"])
        out["source"].append(source)
        out["split"].append(split)
        out["question"].append(r["question"])
        out["messages"].append(r["messages"])
        out["response"].append(r["response"])
        out["n_tokens"].append(len(ids))
        out["too_long"].append(len(ids) > max_tokens)
        out["row_hash"].append(row_hash(split, source, r["messages"], r["response"]))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return pa.table(out, schema=TOKENIZED_SCHEMA)


def replay_rows(t: pa.Table) -> pa.Table:
    """(question, answer) rows -> the labeled shape tokenize_rows reads, split train."""
    qs = t["question"].to_pylist()
    ans = t["response"].to_pylist()
    rids = t["request_id"].to_pylist()
    msgs = [json.dumps([{"content": q, "role": "user"}], ensure_ascii=False, sort_keys=True) for q in qs]
    return pa.table(
        {"request_id": rids, "split": ["train"] * len(qs), "question": qs, "messages": msgs, "response": ans}
    )


def sample_by_hash(t: pa.Table, fraction: float) -> pa.Table:
    """Keep rows whose content hash falls under ``fraction``: a deterministic sample."""
    import pyarrow.compute as pc

    keep = [unit_hash("replay\0" + h) < fraction for h in t["row_hash"].to_pylist()]
    return t.filter(pc.cast(pa.array(keep), pa.bool_()))


def pack_group(group: pa.Table, block_size: int, pad_id: int, share_blocks: bool = True) -> pa.Table:
    """Pack one hash bucket of examples, ordered by content hash (deterministic)."""
    import pyarrow.compute as pc

    group = group.take(pc.sort_indices(group, sort_keys=[("row_hash", "ascending")]))
    examples = zip(group["input_ids"].to_pylist(), group["labels"].to_pylist(), strict=True)
    blocks = pack(examples, block_size, pad_id, share_blocks=share_blocks)
    out = pa.Table.from_pylist(blocks, schema=BLOCKS_SCHEMA) if blocks else BLOCKS_SCHEMA.empty_table()
    if "split" in group.column_names and group.num_rows:
        # Keep the partition key so the write can route blocks to their split.
        out = out.append_column("split", pa.array([group["split"][0].as_py()] * out.num_rows, pa.string()))
    return out


def add_bucket(t: pa.Table, n_buckets: int) -> pa.Table:
    """The packing bucket of each example, from its content hash."""
    buckets = [int(h[:8], 16) % n_buckets for h in t["row_hash"].to_pylist()]
    return t.append_column("bucket", pa.array(buckets, pa.int32()))


def add_key_bucket(t: pa.Table, column: str, n_buckets: int, name: str = "bucket") -> pa.Table:
    """Append ``name``: a stable hash of ``column`` modulo ``n_buckets`` (equal keys, equal bucket)."""
    buckets = [
        int.from_bytes(hashlib.blake2b((v or "").encode(), digest_size=4).digest(), "big") % n_buckets
        for v in t[column].to_pylist()
    ]
    return t.append_column(name, pa.array(buckets, pa.int32()))


def map_key_groups(t: pa.Table, key: str, fn: Any, *args: Any) -> pa.Table:
    """``fn(group, *args)`` for each group of rows with equal ``key``, concatenated (in key order)."""
    import pyarrow.compute as pc

    if t.num_rows == 0:
        raise ValueError("map_key_groups needs at least one row")
    t = t.take(pc.sort_indices(t, sort_keys=[(key, "ascending")]))
    keys = t[key].to_pylist()
    outs: list[pa.Table] = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            outs.append(fn(t.slice(start, i - start), *args))
            start = i
    return pa.concat_tables(outs).combine_chunks()


def resolve_bucket(t: pa.Table, settings: DataSettings, since: datetime | None, n_dedupe_buckets: int) -> pa.Table:
    """One request-id bucket of unioned interactions and feedback -> labeled rows with their dedupe bucket."""
    if t.num_rows == 0:
        return add_key_bucket(LABELED_SCHEMA.empty_table(), "dedupe_key", n_dedupe_buckets, "dbucket")
    labeled = map_key_groups(t, "request_id", resolve_request, settings, since)
    return add_key_bucket(labeled, "dedupe_key", n_dedupe_buckets, "dbucket")


def dedupe_bucket(t: pa.Table, kept_labels: tuple[str, ...]) -> pa.Table:
    """One dedupe-key bucket of labeled rows -> the kept rows, one per dedupe key."""
    import pyarrow.compute as pc

    t = t.select(LABELED_SCHEMA.names).filter(pc.is_in(t["label"], pa.array(kept_labels, pa.string())))
    return map_key_groups(t, "dedupe_key", first_of_duplicates) if t.num_rows else t


def as_train_rows(t: pa.Table) -> pa.Table:
    """A previous snapshot's pairs, re-labelled for the train side of this one."""
    t = t.select(["request_id", "question", "messages", "response"])
    return t.append_column("split", pa.array(["train"] * t.num_rows, pa.string()))
