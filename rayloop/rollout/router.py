"""``RouterIngress``: the serving ingress with weighted, sticky and shadow slots.

It extends :class:`~rayloop.serving.ingress.OpenAIIngress` through its two
hooks: :meth:`pick_slot` applies the :class:`~rayloop.rollout.routing.RouteTable`
(the deployment's ``user_config``, so a new table is applied in place, without
a restart), and :meth:`after_response` records the answer for the live
per-slot metrics and, for a sampled share, mirrors the request to the shadow
slot. The mirror runs as a background task after the primary answered; its
result is stored as a Parquet pair row (``shadow/`` in storage) and never
reaches the user. Feedback ratings are tapped on their way to the interaction
store and joined to their request by id in the stats actor.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import time
from typing import Any

from fastapi import Request

from rayloop.data.capture import utcnow
from rayloop.rollout.routing import CANARY, SHADOW, STABLE, Picker, RouteTable, session_key
from rayloop.rollout.stats import StatsClient, get_stats_actor
from rayloop.serving.ingress import OpenAIIngress
from rayloop.serving.protocol import ReplyHead, ReplyTail

logger = logging.getLogger("ray.serve")


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


class _TappedCapture:
    """Forwards to the capture client; feedback ratings also go to the router stats."""

    def __init__(self, inner: Any, stats: StatsClient) -> None:
        self._inner = inner
        self._stats = stats

    def record(self, table: str, row: dict[str, Any]) -> bool:
        if table == "feedback" and row.get("rating") is not None:
            self._stats.rate(str(row["request_id"]), int(row["rating"]))
        ok: bool = self._inner.record(table, row)
        return ok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class RouterIngress(OpenAIIngress):
    """OpenAI-compatible router over the ``stable``, ``canary`` and ``shadow`` slots.

    Args: as :class:`~rayloop.serving.ingress.OpenAIIngress`. Live metrics go
    to the stats actor of the app this replica belongs to.
    """

    # Serve's ingress wrapper has an async __init__: subclasses must be async too.
    async def __init__(  # type: ignore[misc]
        self,
        slots: dict[str, Any],
        settings: dict[str, Any],
        model: str,
        api_key_hashes: list[str] | None = None,
    ) -> None:
        from ray import serve

        await super().__init__(slots, settings, model, api_key_hashes)  # type: ignore[misc]
        self.app_name = app_name = serve.get_replica_context().app_name
        self.table = RouteTable()
        self.picker = Picker(self.table)
        s = self.settings
        self.stats = StatsClient(lambda: get_stats_actor(app_name, s))
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.shadow_skipped = 0
        if self.capture is not None:
            self.capture = _TappedCapture(self.capture, self.stats)  # type: ignore[assignment]

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with a new :class:`RouteTable`; it applies to the next request."""
        table = RouteTable.model_validate(user_config)
        self.table = table
        self.picker = Picker(table)
        logger.info(
            "route table epoch %d: canary %.1f%%, shadow %.1f%%",
            table.epoch,
            table.canary_percent,
            table.shadow_percent,
        )

    async def routing(self) -> dict[str, Any]:
        """The table this replica applies now, and its shadow bookkeeping (for the controller)."""
        return {
            "table": self.table.model_dump(),
            "shadow_in_flight": len(self._shadow_tasks),
            "shadow_skipped": self.shadow_skipped,
            "stats_dropped": self.stats.dropped,
        }

    async def flush_stats(self) -> None:
        """Ship buffered observations now (tests and the controller before judging)."""
        await self.stats.flush()

    # -- hooks -------------------------------------------------------------
    def pick_slot(self, endpoint: str, body: dict[str, Any], request: Request) -> str:
        slot = self.picker.pick(session_key(request.headers, body))
        if slot == CANARY and CANARY not in self.table.versions:
            return STABLE  # nothing loaded there: never send users to an empty slot
        return slot

    def after_response(self, slot: str, row: dict[str, Any]) -> None:
        self.stats.observe(slot, row)
        if row["status"] != "ok" or SHADOW not in self.table.versions or not self.picker.mirror(row["request_id"]):
            return
        if len(self._shadow_tasks) >= self.settings.rollout.shadow_max_in_flight:
            self.shadow_skipped += 1  # shadow must never pile up work beside the user path
            return
        task = asyncio.get_running_loop().create_task(self._mirror(dict(row)))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    def on_failure(self, slot: str, request_id: str, error: Exception, latency_ms: float) -> None:
        # A slot that cannot answer at all (dead replica, overload) counts against its version.
        version = self.table.versions.get(slot, 0)
        self.stats.observe(
            slot, {"request_id": request_id, "model_version": version, "status": "error", "latency_ms": latency_ms}
        )

    # -- shadow ------------------------------------------------------------
    async def _mirror(self, row: dict[str, Any]) -> None:
        rid = row["request_id"]
        try:
            body = replay_body(row, self.model)
            handle = self.slot_handle(SHADOW, stream=True)
            method = handle.chat if row["endpoint"] == "chat" else handle.completion
            t0 = time.monotonic()
            head: ReplyHead | None = None
            tail: ReplyTail | None = None
            async for item in method.remote(body, f"{rid}-shadow"):
                if isinstance(item, ReplyHead):
                    head = item
                    tail = item.tail
                elif isinstance(item, ReplyTail):
                    tail = item
            latency = (time.monotonic() - t0) * 1000.0
            ok = head is not None and head.status == 200 and tail is not None and tail.error is None
            text = tail.text if tail is not None else ""
            version = head.version if head is not None else self.table.versions.get(SHADOW, 0)
            error = (
                None
                if ok
                else (tail.error if tail is not None and tail.error else f"status {getattr(head, 'status', None)}")
            )
        except Exception as e:
            latency, ok, text, version, error = (
                0.0,
                False,
                "",
                self.table.versions.get(SHADOW, 0),
                f"{type(e).__name__}: {e}",
            )
            tail = None
        primary = row["completion"] or ""
        sim = similarity(primary, text) if ok else 0.0
        exact = ok and primary == text
        self.stats.shadow(
            (
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
        )
        if self.capture is not None:
            self.capture.record(
                "shadow",
                {
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
                },
            )

    async def __del__(self) -> None:
        for t in list(self._shadow_tasks):
            t.cancel()
        try:
            await self.stats.close()
        except Exception:
            pass
        await super().__del__()
