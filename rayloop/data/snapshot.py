"""Snapshots: immutable, content-addressed training data sets.

Layout under the storage root (``rayloop.data.schema.SNAPSHOTS_DIR``)::

    snapshots/<snapshot_id>/manifest.json
    snapshots/<snapshot_id>/train/pairs/*.parquet    plain chat pairs (PAIR_COLUMNS)
    snapshots/<snapshot_id>/train/blocks/*.parquet   tokenized, packed blocks (BLOCK_COLUMNS)
    snapshots/<snapshot_id>/eval/pairs/*.parquet
    snapshots/<snapshot_id>/eval/blocks/*.parquet

The id is a hash of the content (every pair, order-independent), the
tokenizer and the settings that shape blocks, so the same input always gives
the same id and a second run finds the snapshot already there.

    >>> combine_row_hashes(["00" * 16, "00" * 15 + "01"])
    1
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable
from typing import Any

from rayloop.config import Settings
from rayloop.data.schema import SNAPSHOTS_DIR
from rayloop.errors import DataError, NotFoundError
from rayloop.storage import Storage

SPLITS = ("train", "eval")
PAIR_COLUMNS = ("request_id", "source", "question", "messages", "response", "n_tokens", "row_hash")
BLOCK_COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids")
MANIFEST = "manifest.json"


def snapshot_key(snapshot_id: str, *parts: str) -> str:
    return posixpath.join(SNAPSHOTS_DIR, snapshot_id, *parts)


def storage_of(settings: Settings) -> Storage:
    return Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)


def row_hash(split: str, source: str, messages_json: str, response: str) -> str:
    """128-bit hex hash of one pair: what goes into the snapshot id."""
    return hashlib.sha256(f"{split}\0{source}\0{messages_json}\0{response}".encode()).hexdigest()[:32]


def combine_row_hashes(hashes: Iterable[str]) -> int:
    """Order-independent multiset hash (sum mod 2^128): streams, needs no sort."""
    total = 0
    for h in hashes:
        total = (total + int(h, 16)) % (1 << 128)
    return total


def content_id(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _latest_snapshot(st: Storage) -> str:
    import pyarrow.fs as pafs

    infos = []
    if st.fs.get_file_info(st.path(SNAPSHOTS_DIR)).type == pafs.FileType.Directory:
        for info in st.fs.get_file_info(pafs.FileSelector(st.path(SNAPSHOTS_DIR))):
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.Directory and not name.startswith("_"):
                manifest = st.fs.get_file_info(st.path(snapshot_key(name, MANIFEST)))
                if manifest.type == pafs.FileType.File:  # complete snapshots only
                    infos.append((manifest.mtime, name))
    if not infos:
        raise NotFoundError(f"no snapshot in {st.uri}/{SNAPSHOTS_DIR}", hint="Make one with `rayloop data preprocess`.")
    return str(max(infos)[1])


def read_manifest(settings: Settings, snapshot_id: str) -> dict[str, Any]:
    st = storage_of(settings)
    key = snapshot_key(snapshot_id, MANIFEST)
    if not st.exists(key):
        raise NotFoundError(
            f"snapshot {snapshot_id!r} does not exist under {st.uri_of(SNAPSHOTS_DIR)}",
            hint="Create one with `rayloop data preprocess`; list them with `ls $RAYLOOP_HOME/storage/snapshots`.",
        )
    data: dict[str, Any] = json.loads(st.read_bytes(key))
    return data


def resolve_snapshot_id(settings: Settings, ref: str) -> str:
    """The full id of a snapshot given in full, by a unique prefix (summaries print 12 characters), or as
    ``latest`` (the most recently written complete snapshot)."""
    import pyarrow.fs as pafs

    st = storage_of(settings)
    if ref == "latest":
        return _latest_snapshot(st)
    if st.exists(snapshot_key(ref, MANIFEST)):
        return ref
    matches: list[str] = []
    if len(ref) >= 6 and st.fs.get_file_info(st.path(SNAPSHOTS_DIR)).type == pafs.FileType.Directory:
        for info in st.fs.get_file_info(pafs.FileSelector(st.path(SNAPSHOTS_DIR))):
            name = posixpath.basename(info.path)
            if info.type != pafs.FileType.Directory or not name.startswith(ref) or name.startswith("_"):
                continue
            if st.exists(snapshot_key(name, MANIFEST)):  # complete snapshots only
                matches.append(name)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise DataError(
            f"snapshot prefix {ref!r} matches {len(matches)} snapshots: {', '.join(sorted(matches))}",
            hint="Give more characters of the id.",
        )
    read_manifest(settings, ref)  # NotFoundError naming where it looked
    return ref


def parquet_files(st: Storage, key: str) -> list[str]:
    """Filesystem paths of the Parquet files under a key, sorted."""
    return sorted(st.path(k) for k in st.list(key) if k.endswith(".parquet"))


def read_pairs(settings: Settings, snapshot_id: str, split: str = "eval") -> list[dict[str, Any]]:
    """The plain chat pairs of one split (small: for evaluation and inspection)."""
    import pyarrow.parquet as pq

    read_manifest(settings, snapshot_id)
    st = storage_of(settings)
    rows: list[dict[str, Any]] = []
    for path in parquet_files(st, snapshot_key(snapshot_id, split, "pairs")):
        with st.fs.open_input_file(path) as f:
            rows.extend(pq.read_table(f, columns=list(PAIR_COLUMNS)).to_pylist())
    rows.sort(key=lambda r: r["row_hash"])
    return rows


def eval_questions(settings: Settings, snapshot_id: str) -> list[tuple[str, str]]:
    """(question, expected answer) pairs of the eval split, for the evaluation gate."""
    return [(r["question"], r["response"]) for r in read_pairs(settings, snapshot_id, "eval")]
