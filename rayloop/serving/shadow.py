"""Shadow copies: replay an answered request on the shadow slot and compare; the user never sees it.

:func:`mirror` runs as a background task of the stable replica after the
primary answered. Its result is one pair for the stats actor (agreement,
latency delta) and one ``shadow`` capture row (both completions), so a shadow
run can be judged live and read back later.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable
from typing import Any

from rayloop.data.capture import utcnow
from rayloop.serving.protocol import ReplyHead, ReplyTail
from rayloop.serving.routing import SHADOW, RouteTable
from rayloop.serving.stats import ShadowPair, StatsClient


def similarity(a: str, b: str) -> float:
    """Word-level similarity in [0, 1] (1 = same words in the same order)."""
    if a == b:
        return 1.0
    return difflib.SequenceMatcher(a=a.split(), b=b.split(), autojunk=False).ratio()


def replay_body(row: dict[str, Any], model: str) -> dict[str, Any]:
    """The request body of an interaction row, non-streaming (what the shadow slot gets)."""
    body: dict[str, Any] = json.loads(row["sampling_params"] or "{}")
    for k in ("stream", "stream_options"):
        body.pop(k, None)
    body["model"] = model
    if row["endpoint"] == "chat":
        body["messages"] = json.loads(row["messages"])
    else:
        body["prompt"] = row["prompt"]
    return body


class TappedCapture:
    """Forwards to the capture client; while ``observing()``, feedback ratings also go to the stats actor."""

    def __init__(self, inner: Any, stats: StatsClient, observing: Callable[[], bool]) -> None:
        self._inner = inner
        self._stats = stats
        self._observing = observing

    def record(self, table: str, row: dict[str, Any]) -> bool:
        if table == "feedback" and row.get("rating") is not None and self._observing():
            self._stats.rate(str(row["request_id"]), int(row["rating"]))
        ok: bool = self._inner.record(table, row)
        return ok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def mirror(handle: Any, row: dict[str, Any], model: str, table: RouteTable) -> tuple[ShadowPair, dict[str, Any]]:
    """Send ``row``'s request to the shadow slot (``handle``, streaming); return the stats pair and the capture row."""
    rid = row["request_id"]
    tail: ReplyTail | None = None
    try:
        body = replay_body(row, model)
        method = handle.chat if row["endpoint"] == "chat" else handle.completion
        t0 = time.monotonic()
        head: ReplyHead | None = None
        async for item in method.remote(body, f"{rid}-shadow"):
            if isinstance(item, ReplyHead):
                head = item
                tail = item.tail
            elif isinstance(item, ReplyTail):
                tail = item
        latency = (time.monotonic() - t0) * 1000.0
        ok = head is not None and head.status == 200 and tail is not None and tail.error is None
        text = tail.text if tail is not None else ""
        version = head.version if head is not None else table.versions.get(SHADOW, 0)
        error = (
            None
            if ok
            else (tail.error if tail is not None and tail.error else f"status {getattr(head, 'status', None)}")
        )
    except Exception as e:
        latency, ok, text, version, error = 0.0, False, "", table.versions.get(SHADOW, 0), f"{type(e).__name__}: {e}"
        tail = None
    primary = row["completion"] or ""
    sim = similarity(primary, text) if ok else 0.0
    exact = ok and primary == text
    pair: ShadowPair = (
        time.time(),
        rid,
        int(row["model_version"]),
        int(version),
        ok,
        latency,
        float(row["latency_ms"] or 0.0),
        exact,
        sim,
    )
    shadow_row = {
        "request_id": rid,
        "timestamp": utcnow(),
        "model_name": row["model_name"],
        "primary_version": int(row["model_version"]),
        "shadow_version": int(version),
        "endpoint": row["endpoint"],
        "messages": row["messages"],
        "prompt": row["prompt"],
        "primary_completion": primary,
        "shadow_completion": text if ok else None,
        "primary_latency_ms": row["latency_ms"],
        "shadow_latency_ms": latency if ok else None,
        "primary_tokens": row["completion_tokens"],
        "shadow_tokens": tail.completion_tokens if ok and tail is not None else None,
        "shadow_status": "ok" if ok else f"error: {error}"[:500],
        "exact_match": exact,
        "similarity": sim,
    }
    return pair, shadow_row
