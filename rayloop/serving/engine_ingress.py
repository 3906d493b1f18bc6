"""``EngineIngress``: the stable slot's replicas, HTTP ingress, router and engine in one process.

Every request of the serving app reaches a stable replica first (Serve proxy ->
replica): with nothing routed elsewhere, this replica's own
:class:`~rayloop.serving.server.LLMServer` answers through a local slot, so
auth, capture, feedback, metrics and headers are
:class:`~rayloop.serving.ingress.OpenAIIngress`'s code and a request crosses no
other process (``benchmarks/serve/bench_serve.py``). During a rollout the
replica applies its :class:`~rayloop.serving.routing.RouteTable` (``routes`` in
the deployment's ``user_config``, so a new table is applied in place):

- **weighted and sticky**: a share of requests (of sessions) goes to the
  ``canary`` slot (blue-green's green) through a deployment handle;
- **shadow**: a sampled share of answered requests is copied to the ``shadow``
  slot after the primary answered; the result is stored as a pair row
  (``shadow/`` in storage) and never reaches the user;
- **observe**: while a rollout judges live traffic, each answer (and each
  feedback rating, joined by request id) goes to the app's stats actor
  (:mod:`rayloop.serving.stats`) for the controller's analysis. Client errors
  (4xx, disconnects) are not held against a version.

The queue limit is in the replica: Serve's proxy would answer an overflow with
its own plain-text 503, so the deployment admits ``max_ongoing_requests +
max_queued_requests`` and the replica answers an OpenAI-style 503 with
``Retry-After`` beyond that (vLLM's scheduler queues what exceeds
``max_num_seqs``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from rayloop.monitoring.loop import LoopExporter
from rayloop.serving.ingress import OpenAIIngress
from rayloop.serving.metrics import metrics_module
from rayloop.serving.protocol import ReplyHead, ReplyTail, served_model_id
from rayloop.serving.routing import CANARY, SHADOW, STABLE, Picker, RouteTable, routing_secret, session_key
from rayloop.serving.server import LLMServer
from rayloop.serving.shadow import TappedCapture, mirror
from rayloop.serving.stats import StatsClient, get_stats_actor

logger = logging.getLogger("ray.serve")


class _LocalMethod:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class _LocalSlot:
    """What :class:`OpenAIIngress` uses of a slot's deployment handle, over the server in this process."""

    def __init__(self, owner: EngineIngress) -> None:
        self._owner = owner

    def options(self, **_: Any) -> _LocalSlot:
        return self

    @property
    def chat(self) -> _LocalMethod:
        return _LocalMethod(lambda body, rid: self._owner._admit(self._owner.server.chat(body, rid)))

    @property
    def completion(self) -> _LocalMethod:
        return _LocalMethod(lambda body, rid: self._owner._admit(self._owner.server.completion(body, rid)))

    @property
    def models(self) -> _LocalMethod:
        return _LocalMethod(self._owner.server.models)

    @property
    def info(self) -> _LocalMethod:
        return _LocalMethod(self._owner.server.info)


class EngineIngress(OpenAIIngress):
    """The serving app's stable deployment (see the module docstring).

    Args:
        settings: ``Settings`` as a dict.
        model: the model name clients use.
        api_key_hashes: sha256 hashes of accepted bearer keys (besides those in env/file).
        engine_cls: ``"module:Class"`` of the engine (default vLLM).
        slots: handles of the other slots' deployments (``canary``, ``shadow``).
    """

    async def __init__(  # type: ignore[misc]  # Serve's ingress wrapper has an async __init__
        self,
        settings: dict[str, Any],
        model: str,
        api_key_hashes: list[str] | None = None,
        engine_cls: str | None = None,
        slots: dict[str, Any] | None = None,
    ) -> None:
        self.server = LLMServer(settings, STABLE, engine_cls)
        self.in_flight = 0
        await super().__init__({STABLE: _LocalSlot(self), **(slots or {})}, settings, model, api_key_hashes)  # type: ignore[misc]
        sv = self.settings.serving
        self.admit_limit = sv.max_ongoing_requests + sv.max_queued_requests
        self.capture_peers = sv.replicas > 1  # every replica is an ingress with its own capture buffer
        self.server._metrics = self.metrics  # one set of metric handles per process
        self.table = RouteTable()
        from rayloop.storage import Storage

        storage = Storage(self.settings.storage_root, s3_endpoint=self.settings.storage.s3_endpoint)
        self.secret = routing_secret(storage)
        self.picker = Picker(self.table, secret=self.secret)
        self.stats = StatsClient(self._stats_actor)
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.shadow_skipped = 0
        self.loop_metrics: LoopExporter | None = None
        if sv.metrics:
            # Rollout and gate metrics, read back from the registry (whoever runs the controller).
            # (Serve's metric classes: the series carry this app's `application` label, so several clusters'
            # or registries' apps serving one model name stay apart)
            self.loop_metrics = LoopExporter(
                self.settings, model, self.settings.monitoring.registry_poll_s, metrics=metrics_module()
            )
            self.loop_metrics.start()
        if self.capture is not None:
            self.capture = TappedCapture(self.capture, self.stats, lambda: self.table.observe)  # type: ignore[assignment]

    def _stats_actor(self) -> Any:
        from ray import serve

        return get_stats_actor(serve.get_replica_context().app_name, self.settings)

    def slot_handle(self, slot: str, *, stream: bool = False) -> Any:
        if slot == STABLE:
            return self.slots[STABLE]
        return super().slot_handle(slot, stream=stream)

    async def _admit(
        self, gen: AsyncIterator[ReplyHead | str | ReplyTail]
    ) -> AsyncIterator[ReplyHead | str | ReplyTail]:
        """Count the request while the engine works on it; beyond the limit, Serve's own overload error."""
        if self.in_flight >= self.admit_limit:
            from ray.serve.exceptions import BackPressureError

            await gen.aclose()  # type: ignore[attr-defined]
            raise BackPressureError(num_queued_requests=self.in_flight, max_queued_requests=self.admit_limit)
        self.in_flight += 1
        counted = True
        try:
            async for item in gen:
                if counted and isinstance(item, ReplyHead) and not item.streaming:
                    # The whole answer is in the head: the ingress will not read further.
                    self.in_flight -= 1
                    counted = False
                yield item
        finally:
            if counted:
                self.in_flight -= 1
            await gen.aclose()  # type: ignore[attr-defined]

    # -- routing hooks ----------------------------------------------------------
    def served_slots(self) -> dict[str, int]:
        served = {CANARY: self.table.versions[CANARY]} if CANARY in self.table.versions else {}
        version = self.server.version  # this replica's own engine: exact, also in the middle of a swap
        if version is not None:
            served[STABLE] = version
        return served

    async def model_listing(self) -> dict[str, Any]:
        """The stable version's listing, plus the canary's version while one is in the table (clients may pin
        ``NAME@vN`` to either)."""
        listing = await super().model_listing()
        canary = self.table.versions.get(CANARY)
        data = list(listing.get("data") or [])
        ids = {m.get("id") for m in data}
        own = next((m for m in data if m.get("id") == served_model_id(self.model, self.server.version or 0)), None)
        if canary is not None and own is not None and served_model_id(self.model, canary) not in ids:
            data.append({**own, "id": served_model_id(self.model, canary)})
        return {**listing, "data": data}

    def pick_slot(self, endpoint: str, body: dict[str, Any], request: Request) -> str:
        slot = self.picker.pick(session_key(request.headers, body))
        if slot == CANARY and CANARY not in self.table.versions:
            return STABLE  # nothing loaded there: never send users to an empty slot
        return slot

    def after_response(self, slot: str, row: dict[str, Any]) -> None:
        t = self.table
        if t.observe:
            self.stats.observe(slot, row)
        if row["status"] != "ok" or row.get("opted_out") or SHADOW not in t.versions:
            return
        if not self.picker.mirror(row["request_id"]):
            return
        if len(self._shadow_tasks) >= self.settings.rollout.shadow_max_in_flight:
            self.shadow_skipped += 1  # shadow must never pile up work beside the user path
            return
        task = asyncio.get_running_loop().create_task(self._mirror(dict(row)))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    def on_failure(self, slot: str, request_id: str, error: Exception, latency_ms: float) -> None:
        # A slot that cannot answer at all (dead replica, overload) counts against its version.
        if self.table.observe:
            version = self.table.versions.get(slot, 0)
            self.stats.observe(
                slot,
                {"request_id": request_id, "model_version": version, "status": "error", "latency_ms": latency_ms},
            )

    async def _mirror(self, row: dict[str, Any]) -> None:
        pair, shadow_row = await mirror(self.slot_handle(SHADOW, stream=True), row, self.model, self.table)
        self.stats.shadow(pair)
        if self.capture is not None:
            self.capture.record("shadow", shadow_row)

    # -- what Serve and rayloop call on the deployment ------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's ``user_config``: the route table, then the version."""
        from rayloop.serving.app import ROUTES_KEY

        uc = dict(user_config)
        routes = uc.pop(ROUTES_KEY, None)
        if routes is not None:
            table = RouteTable.model_validate(routes)
            if table != self.table:
                self.table, self.picker = table, Picker(table, secret=self.secret)
                logger.info(
                    "route table epoch %d: canary %.1f%%, shadow %.1f%%, observe %s",
                    table.epoch,
                    table.canary_percent,
                    table.shadow_percent,
                    table.observe,
                )
        if uc:
            await self.server.reconfigure(uc)
        self.metrics.set_traffic(self.model, self.table, self.server.version)

    async def check_health(self) -> None:
        await self.server.check_health()

    async def info(self) -> dict[str, Any]:
        """What this replica serves, and the route table it applies."""
        return {**(await self.server.info()), "table": self.table.model_dump(mode="json")}

    async def routing(self) -> dict[str, Any]:
        """The table this replica applies now, and its shadow bookkeeping (for the controller)."""
        return {
            "table": self.table.model_dump(mode="json"),
            "shadow_in_flight": len(self._shadow_tasks),
            "shadow_skipped": self.shadow_skipped,
            "stats_dropped": self.stats.dropped,
        }

    async def flush_stats(self) -> None:
        """Ship buffered observations now (tests and the controller before judging)."""
        await self.stats.flush()

    async def __del__(self) -> None:
        for t in list(self._shadow_tasks):
            t.cancel()
        try:
            await self.stats.close()
        except Exception:
            pass
        try:
            await super().__del__()
        finally:
            await self.server.__del__()
