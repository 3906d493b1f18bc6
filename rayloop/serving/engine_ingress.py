"""``EngineIngress``: the plain app's one deployment, HTTP ingress and engine replica in one process.

The plain serving app (one slot, no router) does not need a separate ingress
deployment: every request would otherwise cross the Serve proxy, the ingress
replica and the engine replica, and on a CPU-bound machine those hops cost
TTFT and tokens/s (``benchmarks/serve/bench_serve.py``, variant
``separate-ingress``). Here each engine replica serves the OpenAI routes
itself: :class:`~rayloop.serving.ingress.OpenAIIngress`'s code (auth, capture,
feedback, metrics, headers) over a local slot that calls this replica's own
:class:`~rayloop.serving.server.LLMServer` directly.

The deployment keeps the engine deployment's name (``llm-stable``), so
upgrades are the same ``user_config`` change (``reconfigure`` delegates to the
server). The queue limit moves into the replica: Serve's proxy would answer an
overflow with its own plain-text 503, so the deployment admits
``max_ongoing_requests + max_queued_requests`` and the replica answers an
OpenAI-style 503 with ``Retry-After`` beyond that (vLLM's scheduler queues
what exceeds ``max_num_seqs``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from rayloop.serving.ingress import OpenAIIngress
from rayloop.serving.protocol import ReplyHead, ReplyTail
from rayloop.serving.server import LLMServer


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
    """The plain app's deployment (see the module docstring).

    Args:
        settings: ``Settings`` as a dict.
        model: the model name clients use.
        api_key_hashes: sha256 hashes of accepted bearer keys (besides those in env/file).
        engine_cls: ``"module:Class"`` of the engine (default vLLM).
    """

    async def __init__(  # type: ignore[misc]  # Serve's ingress wrapper has an async __init__
        self,
        settings: dict[str, Any],
        model: str,
        api_key_hashes: list[str] | None = None,
        engine_cls: str | None = None,
    ) -> None:
        from rayloop.serving.app import STABLE_SLOT

        self.server = LLMServer(settings, STABLE_SLOT, engine_cls)
        self.in_flight = 0
        await super().__init__({STABLE_SLOT: _LocalSlot(self)}, settings, model, api_key_hashes)  # type: ignore[misc]
        sv = self.settings.serving
        self.admit_limit = sv.max_ongoing_requests + sv.max_queued_requests
        self.capture_peers = sv.replicas > 1  # every replica is an ingress with its own capture buffer
        self.server._metrics = self.metrics  # one set of metric handles per process

    def slot_handle(self, slot: str, *, stream: bool = False) -> Any:
        return self.slots[slot]

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

    # -- what Serve and rayloop call on the deployment ------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self.server.reconfigure(user_config)

    async def check_health(self) -> None:
        await self.server.check_health()

    async def info(self) -> dict[str, Any]:
        return await self.server.info()

    async def __del__(self) -> None:
        try:
            await super().__del__()
        finally:
            await self.server.__del__()
