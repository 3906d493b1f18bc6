"""Training and evaluation records from files: what a user brings besides the captured interactions.

A file is JSON Lines (``.jsonl``) or Parquet (``.parquet``), local or in object storage (any URI the
storage layer reads). Each record is one of

- a chat: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}``;
  the pair is the last user message and the assistant message after it;
- a completion: ``{"prompt": ..., "completion": ...}``;
- a question and its answer: ``{"question": ..., "answer": ...}``.

A record that is none of these is an error naming the file and the line (row), never skipped silently.

    >>> pairs = read_pairs("extra.jsonl")          # [(question, answer), ...]
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

from rayloop.errors import DataError
from rayloop.storage import Storage

FORMATS = ("chat", "completion", "question-answer")


def _pair(rec: Any) -> tuple[str, str]:
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, not {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ValueError("'messages' must be a list of {role, content} objects")
        answer_at = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if answer_at is None:
            raise ValueError("a chat record needs an assistant message (the answer to train on)")
        question = next((m for m in reversed(msgs[:answer_at]) if m.get("role") == "user"), None)
        if question is None:
            raise ValueError("a chat record needs a user message before its assistant message")
        q, a = question.get("content"), msgs[answer_at].get("content")
    elif "prompt" in rec or "completion" in rec:
        q, a = rec.get("prompt"), rec.get("completion")
    elif "question" in rec or "answer" in rec:
        q, a = rec.get("question"), rec.get("answer")
    else:
        raise ValueError(f"a record needs 'messages', 'prompt'/'completion' or 'question'/'answer'; got {sorted(rec)}")
    if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
        raise ValueError("the question and the answer must be non-empty strings")
    return q, a


def _open(uri: str, s3_endpoint: str | None) -> tuple[Storage, str]:
    """A storage rooted at the file's directory, and its name."""
    return Storage(posixpath.dirname(uri) or ".", s3_endpoint=s3_endpoint), posixpath.basename(uri)


def read_pairs(uri: str, *, s3_endpoint: str | None = None) -> list[tuple[str, str]]:
    """Every record of a JSONL or Parquet file as a ``(question, answer)`` pair."""
    st, name = _open(uri, s3_endpoint)
    if not st.exists(name):
        raise DataError(f"no such file: {uri}", hint="Check the path (local, or an s3:// URI).")
    pairs: list[tuple[str, str]] = []
    if name.endswith(".jsonl"):
        for n, line in enumerate(st.read_bytes(name).decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                pairs.append(_pair(json.loads(line)))
            except ValueError as e:
                raise DataError(f"{uri}, line {n}: {e}", hint=f"Each line is a record: {', '.join(FORMATS)}.") from None
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with st.fs.open_input_file(st.path(name)) as f:
            rows = pq.read_table(f).to_pylist()
        for n, row in enumerate(rows, 1):
            if isinstance(row.get("messages"), str):
                row["messages"] = json.loads(row["messages"])
            try:
                pairs.append(_pair(row))
            except ValueError as e:
                raise DataError(f"{uri}, row {n}: {e}", hint=f"Each row is a record: {', '.join(FORMATS)}.") from None
    else:
        raise DataError(f"{uri}: not a .jsonl or .parquet file", hint="Records come as JSON Lines or Parquet.")
    if not pairs:
        raise DataError(f"{uri} holds no records", hint="Give a file with at least one record, or drop it.")
    return pairs


def write_pairs_jsonl(pairs: list[tuple[str, str]]) -> bytes:
    """``(question, answer)`` pairs as JSON Lines of completion records (the format :func:`read_pairs` reads)."""
    return "".join(json.dumps({"prompt": q, "completion": a}, ensure_ascii=False) + "\n" for q, a in pairs).encode()


def pairs_fingerprint(pairs: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()[:16]
