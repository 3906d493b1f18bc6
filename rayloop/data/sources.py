"""Find the interaction and feedback files a preprocessing run reads.

Files are listed under ``interactions/`` and ``feedback/`` and filtered by
their Hive partitions (``date=`` at or after ``--since``, ``model=`` when a
model is named). Each file's footer is read before Ray Data sees it: a file
that is truncated, not Parquet, or lacks the columns we need is skipped and
named in the manifest instead of failing the whole run (the capture writer
may be mid-write, or a disk may have lost a block).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rayloop.errors import ConfigError
from rayloop.storage import Storage


def parse_since(value: str | None) -> datetime | None:
    """ISO date or datetime (``2026-01-31``, ``2026-01-31T12:00:00+00:00``); naive means UTC."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--since {value!r} is not an ISO date or datetime", hint="Use e.g. 2026-01-31 or 2026-01-31T12:00:00Z."
        ) from None


@dataclass
class SourceScan:
    """What was found under one source directory."""

    root: str
    files: list[str] = field(default_factory=list)  # filesystem paths, sorted
    partitions: list[str] = field(default_factory=list)  # keys relative to the storage root
    corrupt: list[dict[str, str]] = field(default_factory=list)
    rows: int = 0

    def describe(self) -> dict[str, Any]:
        return {"root": self.root, "files": len(self.files), "rows": self.rows, "partitions": self.partitions}


def _hive(key: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for seg in posixpath.dirname(key).split("/"):
        k, sep, v = seg.partition("=")
        if sep:
            out[k] = v
    return out


def scan(
    st: Storage,
    root: str,
    required: tuple[str, ...],
    *,
    since: datetime | None = None,
    model_name: str | None = None,
) -> SourceScan:
    import pyarrow.parquet as pq

    res = SourceScan(root=root)
    since_day = since.date().isoformat() if since else None
    parts: set[str] = set()
    for key in sorted(st.list(root)):
        if not key.endswith(".parquet") or key.rsplit("/", 1)[-1].startswith((".", "_")):
            continue  # a writer's temporary file (or another tool's hidden one): never training data
        hive = _hive(key)
        if since_day and hive.get("date", "9999") < since_day:
            continue
        if model_name is not None and "model" in hive and hive["model"] != model_name:
            continue
        path = st.path(key)
        try:
            with st.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
                nrows = pf.metadata.num_rows
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or foreign files
            res.corrupt.append({"path": key, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        missing = [c for c in required if c not in names]
        if missing:
            res.corrupt.append({"path": key, "error": f"missing columns {missing}"})
            continue
        res.files.append(path)
        res.rows += nrows
        parts.add(posixpath.dirname(key))
    res.partitions = sorted(parts)
    return res
