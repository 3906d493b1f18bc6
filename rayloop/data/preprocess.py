"""Interactions + feedback -> a content-addressed training snapshot, with Ray Data.

Steps (each streams: a task holds one block or one bucket of ~5k rows; no step sorts the
whole dataset)::

    read interactions, feedback (Parquet; corrupt files skipped and named)
    -> union, hash-bucketed by request id                 => staging/joined/bucket=K
    -> per bucket: group by request id (joins them, folds repeated feedback)
       -> policy (corrections replace, positive keeps, negative drops, unrated per setting)
       -> PII scrub (counted) -> split by prompt hash     => staging/labeled/dbucket=K
    -> per dedupe bucket: dedupe (normalised prompt+response hash)
       -> chat template + tokenize -> mark over-long rows => staging/tokenized
    -> + replay sample of the parent's training data (train side only)
    -> train/pairs, eval/pairs -> per content-hash bucket: pack into blocks
                                                           => train/blocks, eval/blocks
    -> snapshot id = hash(content, tokenizer, block size); manifest.json

Row counts at every step are read back from the staged Parquet, so they are
exact. Example::

    from rayloop.config import load_settings
    from rayloop.data.preprocess import preprocess
    from rayloop.data.replay import ReplaySource
    info = preprocess(load_settings(), model_dir=Path(".rayloop/base-model"),
                      replay=ReplaySource.from_model_dir(".rayloop/base-model"))
    print(info.snapshot_id, info.counts)
"""

from __future__ import annotations

import json
import math
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rayloop.config import Settings
from rayloop.data import transforms as T
from rayloop.data.format import TokenizerRef, tokenizer_facts, tokenizer_fingerprint
from rayloop.data.pii import PII_KINDS
from rayloop.data.policy import KEPT_LABELS, LABELS
from rayloop.data.records import read_pairs
from rayloop.data.replay import ReplaySource, rank_key, sample_pairs
from rayloop.data.schema import FEEDBACK_DIR, INTERACTIONS_DIR, SNAPSHOTS_DIR
from rayloop.data.snapshot import (
    MANIFEST,
    PAIR_COLUMNS,
    SPLITS,
    combine_row_hashes,
    content_id,
    parquet_files,
    read_manifest,
    snapshot_key,
    storage_of,
)
from rayloop.data.sources import scan
from rayloop.errors import DataError, EmptyDatasetError
from rayloop.storage import Storage

FORMAT_VERSION = 1
ROWS_PER_PACK_BUCKET = 8192  # bounds the rows one packing task holds


@dataclass
class SnapshotInfo:
    """What :func:`preprocess` wrote."""

    snapshot_id: str
    uri: str
    counts: dict[str, int] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


def _scan_columns(st: Storage, key: str, columns: list[str]) -> Any:
    """Stream the named columns of a staged Parquet directory, one row group at a time.

    Not ``pyarrow.dataset``: its scanner reads several files and batches ahead, and on 100k rows that
    grew the driver by ~1.5 GB (the memory pool keeps what it took). Here the driver holds one row group
    of the named columns, however many rows there are.
    """
    import pyarrow.parquet as pq

    for path in parquet_files(st, key):
        with st.fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=65536, columns=columns)


def _value_counts(st: Storage, key: str, column: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in _scan_columns(st, key, [column]):
        for v in b.column(0).value_counts().to_pylist():
            out[str(v["values"])] = out.get(str(v["values"]), 0) + int(v["counts"])
    return out


def _num_rows(st: Storage, key: str) -> int:
    import pyarrow.parquet as pq

    n = 0
    for path in parquet_files(st, key):
        with st.fs.open_input_file(path) as f:
            n += pq.ParquetFile(f).metadata.num_rows
    return n


def _move_dir(st: Storage, src: str, dst: str) -> None:
    if st.is_local:
        st.makedirs(posixpath.dirname(dst))
        st.fs.move(st.path(src), st.path(dst))
        return
    import pyarrow.fs as pafs

    # Object stores have no directory rename: copy, then delete the staging copy.
    pafs.copy_files(st.path(src), st.path(dst), source_filesystem=st.fs, destination_filesystem=st.fs)
    st.delete(src)


def _read(st: Storage, key: str, **kw: Any) -> Any:
    import ray.data

    kw.setdefault("partitioning", None)
    if kw["partitioning"] == "hive":
        from ray.data.datasource.partitioning import Partitioning, PartitionStyle

        kw["partitioning"] = Partitioning(PartitionStyle.HIVE, base_dir=st.path(key), filesystem=st.fs)
    return ray.data.read_parquet(parquet_files(st, key), filesystem=st.fs, **kw)


def preprocess(
    settings: Settings,
    *,
    model_dir: Path,
    model_name: str | None = None,
    since: datetime | None = None,
    replay: ReplaySource | None = None,
) -> SnapshotInfo:
    """Build a training snapshot from the interaction store; returns its id, counts and manifest.

    ``model_dir`` supplies the tokenizer and chat template (the parent model).
    ``replay`` mixes ``settings.data.replay_ratio`` parent rows per new train row.
    Raises :class:`EmptyDatasetError` (and writes nothing) when no interaction is
    read or the policy selects none.
    """
    import ray.data

    from rayloop.raysession import data_context, ensure_ray

    t0 = time.monotonic()
    ds_cfg = settings.data
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    st = storage_of(settings)
    tok_facts = tokenizer_facts(model_dir)  # validates it: chat template, EOS
    tok_fp = tokenizer_fingerprint(model_dir)
    tok = TokenizerRef(model_dir, tok_fp)  # what the tokenizing tasks load
    if replay is not None and replay.kind == "snapshot":
        assert replay.snapshot_id is not None
        read_manifest(settings, replay.snapshot_id)  # fail early with NotFoundError

    inter_scan = scan(st, INTERACTIONS_DIR, ("request_id", "status", "completion"), since=since, model_name=model_name)
    fb_scan = scan(st, FEEDBACK_DIR, ("request_id", "rating", "correction"), since=since)
    if not inter_scan.files:
        where = st.uri_of(INTERACTIONS_DIR)
        extra = f" ({len(inter_scan.corrupt)} corrupt files skipped)" if inter_scan.corrupt else ""
        raise EmptyDatasetError(
            f"no interactions to read under {where}"
            + (f" for model {model_name!r}" if model_name else "")
            + (f" since {since.isoformat()}" if since else "")
            + extra
        )

    started_ray = ensure_ray(settings)
    data_context()
    tok = tok.shipped()  # tasks on nodes without model_dir load the tokenizer from Ray's object store
    staging = posixpath.join(SNAPSHOTS_DIR, "_staging", uuid.uuid4().hex[:12])
    try:
        counts: dict[str, int] = {
            "interaction_files": len(inter_scan.files),
            "feedback_files": len(fb_scan.files),
            "corrupt_files_skipped": len(inter_scan.corrupt) + len(fb_scan.corrupt),
            "interaction_rows_read": inter_scan.rows,
            "feedback_rows_read": fb_scan.rows,
        }
        # 1. join + policy + scrub + split -------------------------------------
        # A hash join through files: interactions and feedback go to request-id buckets (one Parquet
        # directory each), then one task per bucket resolves its requests. Memory is one bucket per
        # task, whatever the number of rows; Ray's groupby would sort the whole stage in the object store.
        join_buckets = _buckets(inter_scan.rows + fb_scan.rows)
        inter = ray.data.read_parquet(
            inter_scan.files, filesystem=st.fs, partitioning=None, override_num_blocks=_read_blocks(inter_scan.rows)
        )
        joined = inter.map_batches(_fn(T.interactions_to_common), batch_format="pyarrow")
        if fb_scan.files:
            fb = ray.data.read_parquet(
                fb_scan.files, filesystem=st.fs, partitioning=None, override_num_blocks=_read_blocks(fb_scan.rows)
            )
            joined = joined.union(fb.map_batches(_fn(T.feedback_to_common), batch_format="pyarrow"))
        joined.map_batches(
            _fn(T.add_key_bucket), fn_args=("request_id", join_buckets), batch_format="pyarrow"
        ).write_parquet(st.path(f"{staging}/joined"), filesystem=st.fs, partition_cols=["bucket"])
        # The labeled rows land in dedupe-key buckets, ready for step 2.
        _per_bucket(st, f"{staging}/joined", T.resolve_bucket, (ds_cfg, since, join_buckets)).write_parquet(
            st.path(f"{staging}/labeled"), filesystem=st.fs, partition_cols=["dbucket"]
        )
        st.delete(f"{staging}/joined")

        by_label = _value_counts(st, f"{staging}/labeled", "label")
        for lab in (*LABELS, "orphan_feedback", "before_since"):
            counts[f"label_{lab}"] = by_label.get(lab, 0)
        counts["requests"] = sum(v for k, v in by_label.items() if k != "orphan_feedback")
        counts["selected"] = sum(by_label.get(lab, 0) for lab in KEPT_LABELS)
        pii = dict.fromkeys(PII_KINDS, 0)
        pii_rows = 0
        for b in _scan_columns(st, f"{staging}/labeled", [f"pii_{k}" for k in PII_KINDS]):
            row_any = None
            for i, k in enumerate(PII_KINDS):
                col = b.column(i).to_pylist()
                pii[k] += sum(col)
                row_any = col if row_any is None else [a + c for a, c in zip(row_any, col, strict=True)]
            pii_rows += sum(1 for v in row_any or [] if v)
        if counts["selected"] == 0:
            raise EmptyDatasetError(
                f"the selection policy kept none of {counts['requests']} interactions "
                f"(labels: {dict(sorted(by_label.items()))})",
                hint="Collect feedback first, or set data.unrated=keep to train on unrated rows.",
            )

        # 2. dedupe + tokenize --------------------------------------------------
        tokenized = _per_bucket(st, f"{staging}/labeled", T.dedupe_bucket, (KEPT_LABELS,)).map_batches(
            _fn(T.tokenize_rows), fn_args=(tok, ds_cfg.max_tokens, "interaction"), batch_format="pyarrow"
        )
        tokenized.write_parquet(st.path(f"{staging}/tokenized"), filesystem=st.fs)
        counts["after_dedupe"] = _num_rows(st, f"{staging}/tokenized")
        counts["duplicates_removed"] = counts["selected"] - counts["after_dedupe"]
        too_long = _value_counts(st, f"{staging}/tokenized", "too_long")
        counts["too_long_dropped"] = too_long.get("True", 0)
        sides: dict[str, int] = {"train": 0, "eval": 0}
        for b in _scan_columns(st, f"{staging}/tokenized", ["split", "too_long"]):
            for s, tl in zip(b.column(0).to_pylist(), b.column(1).to_pylist(), strict=True):
                if not tl:
                    sides[s] += 1
        counts["train_new_rows"] = sides["train"]
        counts["eval_rows"] = sides["eval"]
        if sides["train"] + sides["eval"] == 0:
            raise EmptyDatasetError(
                f"every selected row is longer than data.max_tokens={ds_cfg.max_tokens} tokens",
                hint="Raise data.max_tokens.",
            )

        # 3. pairs (+ replay on the train side), one write partitioned by split --
        pairs = _read(st, f"{staging}/tokenized").filter(lambda r: not r["too_long"])
        # Replay must not train on a question the eval split holds (it would flatter the candidate).
        eval_questions = {
            T.normalise(q)
            for b in _scan_columns(st, f"{staging}/tokenized", ["split", "question"])
            for sp, q in zip(b.column(0).to_pylist(), b.column(1).to_pylist(), strict=True)
            if sp == "eval" and q
        }
        replay_ds, replay_info = _replay(settings, st, replay, sides["train"], tok, exclude=eval_questions)
        if replay_ds is not None:
            pairs = pairs.union(replay_ds)
        external_info = []
        for i, ext in enumerate(ds_cfg.external):
            source = ReplaySource.from_pairs(
                read_pairs(ext.path, s3_endpoint=settings.storage.s3_endpoint), name=f"external:{ext.path}"
            )
            ext_ds, info = _replay(
                settings,
                st,
                source,
                sides["train"],
                tok,
                exclude=eval_questions,
                ratio=ext.weight,
                label=f"external-{i}",
            )
            external_info.append({"path": ext.path, "weight": ext.weight, **info})
            if ext_ds is not None:
                pairs = pairs.union(ext_ds)
        pairs.select_columns(["split", *PAIR_COLUMNS, "input_ids", "labels"]).write_parquet(
            st.path(f"{staging}/pairs"), filesystem=st.fs, partition_cols=["split"]
        )
        by_side = _value_counts(st, f"{staging}/pairs", "source")
        counts["replay_rows"] = replay_info["used"] = by_side.get("replay", 0)
        for i, ext_info in enumerate(external_info):
            ext_info["used"] = by_side.get(f"external-{i}", 0)
        counts["external_rows"] = sum(e["used"] for e in external_info)
        for split in SPLITS:
            counts[f"{split}_pairs"] = _num_rows(st, f"{staging}/pairs/split={split}")

        # 4. pack into blocks, per (split, content-hash bucket) -------------------
        n_buckets = max(1, math.ceil(max(counts["train_pairs"], counts["eval_pairs"]) / ROWS_PER_PACK_BUCKET))
        _read(
            st,
            f"{staging}/pairs",
            columns=["split", "row_hash", "input_ids", "labels"],
            partitioning="hive",
            override_num_blocks=min(2 * n_buckets, 16),
        ).map_batches(_fn(T.add_bucket), fn_args=(n_buckets,), batch_format="pyarrow").write_parquet(
            st.path(f"{staging}/packing"), filesystem=st.fs, partition_cols=["split", "bucket"]
        )
        blocks = _per_bucket(
            st,
            f"{staging}/packing",
            T.pack_group,
            (ds_cfg.block_size, tok_facts["pad_token_id"], ds_cfg.pack_examples),
            with_partition_values=True,
        )
        blocks.write_parquet(st.path(f"{staging}/blocks"), filesystem=st.fs, partition_cols=["split"])
        for split in SPLITS:
            counts[f"{split}_blocks"] = _num_rows(st, f"{staging}/blocks/split={split}")
            counts[f"{split}_tokens"] = sum(
                sum(m)
                for b in _scan_columns(st, f"{staging}/blocks/split={split}", ["attention_mask"])
                for m in b.column(0).to_pylist()
            )
            for kind in ("pairs", "blocks"):
                if st.exists(f"{staging}/{kind}/split={split}"):
                    _move_dir(st, f"{staging}/{kind}/split={split}", f"{staging}/out/{split}/{kind}")

        # 5. content id --------------------------------------------------------
        hashes: list[int] = []
        for split in SPLITS:
            total = combine_row_hashes(
                h
                for b in _scan_columns(st, f"{staging}/out/{split}/pairs", ["row_hash"])
                for h in b.column(0).to_pylist()
            )
            hashes.append(total)
        snapshot_id = content_id(
            {
                "format": FORMAT_VERSION,
                "pairs": [f"{h:032x}" for h in hashes],
                "n": [counts["train_pairs"], counts["eval_pairs"]],
                "tokenizer": tok_fp,
                "block_size": ds_cfg.block_size,
                "pack_examples": ds_cfg.pack_examples,
            }
        )
        final = snapshot_key(snapshot_id)
        manifest: dict[str, Any] = {
            "snapshot_id": snapshot_id,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "model_name": model_name,
            "since": since.isoformat() if since else None,
            "sources": {"interactions": inter_scan.describe(), "feedback": fb_scan.describe()},
            "skipped_corrupt_files": inter_scan.corrupt + fb_scan.corrupt,
            "counts": counts,
            "pii_removed": {**pii, "rows": pii_rows},
            "replay": replay_info,
            "external": external_info,
            "tokenizer": {
                "fingerprint": tok_fp,
                "source": str(model_dir),
                **tok_facts,
            },
            "settings": ds_cfg.model_dump(mode="json"),
            "layout": {s: {"pairs": f"{s}/pairs", "blocks": f"{s}/blocks"} for s in SPLITS},
            "seconds": round(time.monotonic() - t0, 2),
        }
        reused = st.exists(snapshot_key(snapshot_id, MANIFEST))
        if reused:
            manifest = read_manifest(settings, snapshot_id)
        else:
            if st.exists(final):  # a half-written earlier attempt: replace it
                st.delete(final)
            _move_dir(st, f"{staging}/out", final)
            st.write_bytes(snapshot_key(snapshot_id, MANIFEST), json.dumps(manifest, indent=1).encode())
        return SnapshotInfo(snapshot_id, st.uri_of(final), dict(manifest["counts"]), manifest, reused)
    finally:
        st.delete(staging)
        if started_ray:
            import ray

            ray.shutdown()


def _fn(f: Any) -> Any:
    """Ray Data's stubs do not type ``fn_args``; the functions are checked where defined."""
    return f


ROWS_PER_BUCKET = 5_000  # what one join or dedupe task holds
ROWS_PER_READ_BLOCK = 20_000


def _buckets(rows: int) -> int:
    """Hash buckets for ``rows`` rows: ~5k rows each, however many rows there are."""
    return rows // ROWS_PER_BUCKET + 1


def _read_blocks(rows: int) -> int:
    """Read blocks of a bucketed stage's input: few (each writes a file into every bucket it has rows for)."""
    return rows // ROWS_PER_READ_BLOCK + 1


def _bucket_dirs(st: Storage, key: str) -> list[dict[str, Any]]:
    """The partition directories of a bucketed write under ``key``: their files and hive values."""
    by_dir: dict[str, list[str]] = {}
    for path in parquet_files(st, key):
        by_dir.setdefault(posixpath.dirname(path), []).append(path)
    base = st.path(key).rstrip("/")
    out = []
    for d, files in sorted(by_dir.items()):
        rel = posixpath.relpath(d, base)
        values = dict(seg.split("=", 1) for seg in rel.split("/") if "=" in seg)
        out.append({"files": files, "values": json.dumps(values, sort_keys=True)})
    return out


def _per_bucket(
    st: Storage, key: str, fn: Any, fn_args: tuple[Any, ...] = (), *, with_partition_values: bool = False
) -> Any:
    """A dataset of ``fn(bucket_table, *fn_args)``, one task per partition directory under ``key``.

    The streaming half of a hash shuffle through files: each task holds one bucket, the driver holds
    one reference per bucket. ``with_partition_values`` appends the directory's hive values
    (``split=train/bucket=3``) as string columns.
    """
    import ray.data

    items = _bucket_dirs(st, key)
    if not items:
        raise DataError(f"no staged rows under {st.uri_of(key)} (an earlier step wrote nothing)")
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _fn(_bucket_task), fn_args=(st.fs, fn, fn_args, with_partition_values), batch_size=1, batch_format="pyarrow"
    )


def _bucket_task(batch: Any, fs: Any, fn: Any, fn_args: tuple[Any, ...], with_values: bool) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    outs = []
    for files, values in zip(batch["files"].to_pylist(), batch["values"].to_pylist(), strict=True):
        tables = []
        for path in files:
            # A file object, not the path: pyarrow would add the hive directories as columns.
            with fs.open_input_file(path) as f:
                tables.append(pq.read_table(f))
        t = pa.concat_tables(tables, promote_options="default")
        if with_values:
            for name, value in json.loads(values).items():
                t = t.append_column(name, pa.array([value] * t.num_rows, pa.string()))
        outs.append(fn(t, *fn_args))
    return pa.concat_tables(outs)


def _replay(
    settings: Settings,
    st: Storage,
    replay: ReplaySource | None,
    n_train: int,
    tok: Any,
    exclude: set[str] | None = None,
    *,
    ratio: float | None = None,
    label: str = "replay",
) -> tuple[Any, dict[str, Any]]:
    """A lazy dataset of ``ratio * n_train`` rows of ``replay`` (deterministic sample; ``ratio`` defaults to
    ``data.replay_ratio``), labelled ``label`` in the pairs' ``source`` column, and its description.

    Rows whose normalised question is in ``exclude`` (the eval split's) are never replayed.
    """
    exclude = exclude or set()
    import pyarrow as pa
    import ray.data

    ratio = settings.data.replay_ratio if ratio is None else ratio
    info: dict[str, Any] = {"kind": None, "ratio": ratio, "requested": 0, "used": 0}
    if replay is None:
        return None, info
    want = round(ratio * n_train)
    info.update(replay.describe())
    info["requested"] = want
    if want == 0:
        return None, info
    if replay.kind == "pairs":
        chosen = sample_pairs([p for p in replay.pairs if T.normalise(p[0]) not in exclude], want)
        table = pa.table(
            {
                "request_id": [f"{label}:{rank_key(q, a)[:16]}" for q, a in chosen],
                "question": [q for q, _ in chosen],
                "response": [a for _, a in chosen],
            }
        )
        src = ray.data.from_arrow(table).map_batches(_fn(T.replay_rows), batch_format="pyarrow")
    else:
        assert replay.snapshot_id is not None
        key = snapshot_key(replay.snapshot_id, "train", "pairs")
        available = _num_rows(st, key)
        info["available"] = available
        if available == 0:
            raise DataError(f"replay snapshot {replay.snapshot_id!r} has no train pairs", hint="Pick another snapshot.")
        frac = min(1.0, want / available)
        src = (
            _read(st, key, columns=["request_id", "question", "messages", "response", "row_hash"])
            .map_batches(_fn(T.sample_by_hash), fn_args=(frac,), batch_format="pyarrow")
            .map_batches(_fn(T.as_train_rows), batch_format="pyarrow")
            .filter(lambda r: T.normalise(r["question"] or "") not in exclude)
        )
    rows = src.map_batches(
        _fn(T.tokenize_rows), fn_args=(tok, settings.data.max_tokens, label), batch_format="pyarrow"
    ).filter(lambda r: not r["too_long"])
    return rows, info
