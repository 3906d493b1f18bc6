"""``LLMServer``: one engine per Serve replica, moved between versions by ``reconfigure``.

The deployment's ``user_config`` is a :class:`~rayloop.serving.protocol.ModelConfig`.
The first one loads an engine. A later one:

1. resolves and validates the checkpoint (files, safetensors headers,
   fingerprint) before the running engine is touched: a bad path would kill it;
2. compares its :class:`~rayloop.serving.checkpoint.Signature` with the loaded
   version's; a different architecture, tensor set or tokenizer rebuilds the
   engine;
3. otherwise swaps the weights in place (``Engine.reload_weights``) and asks
   the golden prompts: answers must equal a fresh engine's recorded answers,
   else the engine is rebuilt and the mismatch reported (log, metric,
   :meth:`info`). No golden record for the target version means no trusted
   in-place swap, so the engine is rebuilt (a fresh engine records one).

Serve routes no traffic to a replica while ``reconfigure`` runs, and changes
replicas one at a time, so the app keeps answering during an upgrade.

A ``parked`` config keeps the engine and its version loaded for a slot the
ingress sends nothing (``rollout.keep_warm_slots``); the next version given to
the slot then goes through the same steps, usually an in-place swap, instead of
a new replica starting an engine.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from rayloop.config import Settings
from rayloop.errors import ConfigError, EngineError, RayloopError
from rayloop.serving import checkpoint, golden
from rayloop.serving.engine import Engine, EngineReply, RequestStats
from rayloop.serving.metrics import NoMetrics, ServingMetrics, serving_metrics
from rayloop.serving.protocol import ModelConfig, ReplyHead, ReplyTail, openai_error
from rayloop.serving.swap import golden_mismatch, swap_blocker
from rayloop.storage import Storage

logger = logging.getLogger("ray.serve")

# Streamed SSE events are joined into one Serve message while the ingress is busy,
# and at most every ``serving.stream_interval_ms``: every message crosses the
# replica, the ingress and the HTTP proxy, and on CPU those hops compete with the
# engine for the same cores.
_STREAM_END = object()


def _reply_tail(st: RequestStats, texts: list[str], error: str | None) -> ReplyTail:
    """What the ingress records of an answer: the engine's counts and each choice's own text."""
    return ReplyTail(
        st.prompt_tokens,
        st.completion_tokens,
        st.ttft_ms,
        st.finish_reason,
        texts[0],
        error=error,
        choices=texts if len(texts) > 1 else None,
    )


def body_choices(body: Any) -> list[str]:
    """Each choice's text in an OpenAI response body, by index (chat ``message.content`` or completion ``text``)."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list):
        return []
    out: list[tuple[int, str]] = []
    for i, c in enumerate(choices):
        if not isinstance(c, dict):
            continue
        msg = c.get("message")
        text = msg.get("content") if isinstance(msg, dict) else c.get("text")
        idx = c.get("index")
        out.append((idx if isinstance(idx, int) else i, text if isinstance(text, str) else ""))
    return [t for _, t in sorted(out)]


def load_engine_cls(path: str | None) -> type[Engine]:
    """``"pkg.module:Class"`` -> the class; None -> :class:`VLLMEngine`."""
    if path is None:
        from rayloop.serving.vllm_engine import VLLMEngine

        return VLLMEngine
    mod, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"engine_cls {path!r} cannot be imported: {e}", hint="Use 'package.module:ClassName'."
        ) from None
    if not isinstance(cls, type):
        raise ConfigError(f"engine_cls {path!r} is not a class", hint="Use 'package.module:ClassName'.")
    engine_cls: type[Engine] = cls  # the Engine protocol: checked by use (it is not runtime-checkable)
    return engine_cls


def resolve_model_dir(cfg: ModelConfig, settings: Settings) -> str:
    """Local directory of the version: ``cfg.path``, or fetched (hash-checked) from the registry."""
    if cfg.path is not None:
        return cfg.path
    try:
        from rayloop.registry import Registry
    except ImportError as e:
        raise ConfigError(
            f"cannot resolve {cfg.model}@{cfg.version}: the registry is not available ({e})",
            hint="Give a local directory in user_config 'path'.",
        ) from None
    reg = Registry.from_settings(settings)
    return str(reg.fetch(f"{cfg.model}@{cfg.version}"))


@dataclass
class SwapReport:
    """How the last version change went (shown by :meth:`LLMServer.info`)."""

    model: str
    version: int
    mode: str  # "fresh" | "in_place" | "rebuild"
    seconds: float
    reason: str = ""
    golden_ok: bool | None = None


@dataclass
class _Loaded:
    cfg: ModelConfig
    model_dir: str
    fingerprint: str
    signature: checkpoint.Signature


def _placement_of_this_replica() -> dict[str, str | None]:
    """The Serve replica id and Ray node id of the calling replica (None for either outside Serve or Ray)."""
    replica = node = None
    try:
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a Serve replica (unit tests, the evaluation engine)
        pass
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return {"replica": replica, "node_id": node}


class LLMServer:
    """Serve deployment class: one engine, one model version at a time.

    Args:
        settings: ``Settings`` as a dict (what Serve configs carry).
        slot: slot name in the ingress (``stable``, ``canary`` or ``shadow``).
        engine_cls: ``"module:Class"`` of the :class:`Engine` (default vLLM);
            tests pass ``"rayloop.serving.fake_engine:FakeEngine"``.
    """

    def __init__(self, settings: dict[str, Any], slot: str = "stable", engine_cls: str | None = None) -> None:
        self._settings = Settings.model_validate(settings)
        self._slot = slot
        self._engine_cls_path = engine_cls
        self._engine_cls = load_engine_cls(engine_cls)
        self._engine: Engine | None = None
        self._loaded: _Loaded | None = None
        self._lock = asyncio.Lock()
        self._storage = Storage(self._settings.storage_root, s3_endpoint=self._settings.storage.s3_endpoint)
        self.last_swap: SwapReport | None = None
        self._streams = 0  # streamed answers in flight on this replica
        self._metrics: ServingMetrics | NoMetrics = NoMetrics()
        try:
            self._metrics = serving_metrics(self._settings.serving.metrics)
        except Exception:  # metrics are best effort (e.g. outside Ray)
            logger.exception("serving metrics are off: creating them failed")

    # -- versions ----------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's ``user_config`` (see the module docstring)."""
        try:
            cfg = ModelConfig.model_validate(user_config)
        except Exception as e:
            raise ConfigError(f"invalid user_config for LLMServer: {e}") from None
        async with self._lock:
            await self._apply(cfg)

    async def _apply(self, cfg: ModelConfig) -> None:
        cur = self._loaded
        if cur is not None and cur.cfg == cfg:
            return
        if cur is not None and cur.cfg.model_copy(update={"parked": cfg.parked}) == cfg:
            # Parked <-> active with the same version: the engine already holds it.
            self._loaded = _Loaded(cfg, cur.model_dir, cur.fingerprint, cur.signature)
            logger.info("slot %s %s %s", self._slot, "parked with" if cfg.parked else "serves", cfg.served_id)
            return
        t0 = time.monotonic()
        model_dir = await asyncio.to_thread(resolve_model_dir, cfg, self._settings)
        # Validate first: a bad path or partial checkpoint must never reach the engine.
        expected = cfg.fingerprint if cfg.path is not None else None
        sig = await asyncio.to_thread(checkpoint.check_model_dir, model_dir, expected_fingerprint=expected)
        fp = (
            cfg.fingerprint
            if cfg.fingerprint is not None
            else await asyncio.to_thread(checkpoint.fingerprint, model_dir)
        )
        target = _Loaded(cfg, model_dir, fp, sig)
        if self._engine is None or cur is None:
            await self._fresh(target, t0, mode="fresh", reason="first load")
            return
        # When a swap may be tried, how, and how it is checked: rayloop.serving.swap (the gate's rules too).
        record = None
        if not cur.signature.differences(sig):
            record = await asyncio.to_thread(golden.load_golden, self._storage, fp, self._settings.serving.engine)
        if why := swap_blocker(cur.signature, sig, golden_known=record is not None):
            await self._fresh(target, t0, mode="rebuild", reason=why)
            return
        assert record is not None
        try:
            await self._engine.reload_weights(model_dir)
            self._engine.set_served_names([cfg.served_id, cfg.model])
            outputs = await golden.run_prompts(self._engine, record.prompts, f"{cfg.model}-v{cfg.version}")
        except Exception as e:
            logger.exception("in-place swap to %s failed; rebuilding the engine", cfg.served_id)
            await self._restore(cur)
            await self._fresh(target, t0, mode="rebuild", reason=f"in-place swap failed: {type(e).__name__}: {e}")
            return
        if bad := golden_mismatch(outputs, record.outputs):
            logger.error("golden prompts %s differ after in-place swap to %s; rebuilding", bad, cfg.served_id)
            self._count_swap(cfg, "in_place", "golden_mismatch")
            await self._restore(cur)
            await self._fresh(target, t0, mode="rebuild", reason=f"golden prompts {bad} differ after in-place swap")
            return
        self._loaded = target
        self._report(SwapReport(cfg.model, cfg.version, "in_place", time.monotonic() - t0, golden_ok=True))

    async def _restore(self, cur: _Loaded) -> None:
        """After a failed in-place swap: the engine goes back to ``cur``'s weights before it answers anything
        else (while the new version's engine is built, this one keeps answering, stamped ``cur``'s version).
        If even that fails, the engine stops: requests get 503 until the rebuild is done, never wrong weights."""
        assert self._engine is not None
        try:
            await self._engine.reload_weights(cur.model_dir)
            self._engine.set_served_names([cur.cfg.served_id, cur.cfg.model])
        except Exception:
            logger.exception("could not restore %s after a failed swap; the engine stops", cur.cfg.served_id)
            old, self._engine, self._loaded = self._engine, None, None
            await old.shutdown()

    async def _fresh(self, target: _Loaded, t0: float, *, mode: str, reason: str) -> None:
        old = self._engine
        if old is not None and self._settings.serving.engine.accelerator == "gpu":
            # Two engines do not fit on one GPU: stop the old one first (Serve sends this replica no traffic now).
            self._engine, self._loaded = None, None
            await old.shutdown()
            old = None
        # On CPU the old engine keeps answering until the new one is ready (a short-lived second engine's
        # memory), so a request that still reaches this replica during the rebuild is not failed.
        engine = self._engine_cls()
        cfg = target.cfg
        await engine.start(target.model_dir, self._settings.serving.engine, [cfg.served_id, cfg.model])
        self._engine = engine
        self._loaded = target
        if old is not None:
            await old.shutdown()
        ok = await self._check_or_record_golden(target)
        self._report(SwapReport(cfg.model, cfg.version, mode, time.monotonic() - t0, reason=reason, golden_ok=ok))

    async def _check_or_record_golden(self, target: _Loaded) -> bool | None:
        """A fresh engine is the reference: record its answers if nobody has yet."""
        assert self._engine is not None
        es = self._settings.serving.engine
        try:
            record = await asyncio.to_thread(golden.load_golden, self._storage, target.fingerprint, es)
            outputs = await golden.run_prompts(self._engine, golden.PROMPTS, f"fresh-{target.cfg.version}")
            if record is None:
                new = golden.GoldenRecord(target.fingerprint, golden.engine_key(es), list(golden.PROMPTS), outputs)
                await asyncio.to_thread(golden.save_golden, self._storage, new, es)
                return True
            if record.prompts == list(golden.PROMPTS) and record.outputs != outputs:
                logger.warning("a fresh engine of %s disagrees with its golden record", target.cfg.served_id)
                return False
            return True
        except Exception:
            logger.exception("golden prompts failed on a fresh engine of %s", target.cfg.served_id)
            return None

    def _report(self, rep: SwapReport) -> None:
        self.last_swap = rep
        logger.info(
            "replica now serves %s@v%d (%s, %.2fs) %s", rep.model, rep.version, rep.mode, rep.seconds, rep.reason
        )
        self._metrics.observe_swap(rep.model, rep.version, rep.mode, "ok", rep.seconds)
        self._metrics.set_engine(rep.model, rep.version, self._slot)

    def _count_swap(self, cfg: ModelConfig, mode: str, outcome: str) -> None:
        self._metrics.observe_swap(cfg.model, cfg.version, mode, outcome)

    # -- requests ----------------------------------------------------------
    async def chat(self, body: dict[str, Any], request_id: str) -> AsyncIterator[ReplyHead | str | ReplyTail]:
        async for item in self._answer("chat", body, request_id):
            yield item

    async def completion(self, body: dict[str, Any], request_id: str) -> AsyncIterator[ReplyHead | str | ReplyTail]:
        async for item in self._answer("completion", body, request_id):
            yield item

    async def _answer(
        self, endpoint: str, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[ReplyHead | str | ReplyTail]:
        engine, loaded = self._engine, self._loaded
        if engine is None or loaded is None:
            yield ReplyHead(503, "", 0, openai_error(503, "no model version is loaded yet", "ServiceUnavailableError"))
            return
        cfg = loaded.cfg
        try:
            if endpoint == "chat":
                reply: EngineReply = await engine.chat(body, request_id)
            else:
                reply = await engine.completion(body, request_id)
        except Exception as e:
            logger.exception("engine failed on request %s", request_id)
            msg = f"engine failed on request {request_id}: {type(e).__name__}"
            yield ReplyHead(
                500, cfg.model, cfg.version, openai_error(500, msg, "InternalServerError"), tail=ReplyTail(error=str(e))
            )
            return
        if reply.stream is None:
            st = reply.stats
            err = None if reply.status == 200 else str((reply.body or {}).get("error", {}).get("message"))
            # The answer's own choices (beam search and n > 1 included), as the client got them.
            tail = _reply_tail(st, body_choices(reply.body) or st.choice_texts(), err)
            yield ReplyHead(reply.status, cfg.model, cfg.version, reply.body, tail=tail)
            return
        yield ReplyHead(200, cfg.model, cfg.version, streaming=True)
        error: str | None = None
        self._streams += 1
        try:
            async for chunk in _coalesce(reply.stream, self._stream_interval):
                yield chunk
        except Exception as e:  # headers are gone: end the stream with an error event
            logger.exception("engine failed mid-stream on request %s", request_id)
            error = f"{type(e).__name__}: {e}"
            yield f'data: {{"error": {{"message": "engine failed on request {request_id}", "type": "InternalServerError", "code": 500}}}}\n\n'
        finally:
            self._streams -= 1
        yield _reply_tail(reply.stats, reply.stats.choice_texts(), error)

    def _stream_interval(self) -> float:
        """Seconds between two messages of one stream: the configured floor, longer under many streams."""
        sv = self._settings.serving
        floor = sv.stream_interval_ms / 1000.0
        if not sv.stream_messages_per_s:
            return floor
        return max(floor, self._streams / sv.stream_messages_per_s)

    @property
    def version(self) -> int | None:
        """The version this replica's engine serves now (None before the first load)."""
        return self._loaded.cfg.version if self._loaded else None

    async def models(self) -> dict[str, Any]:
        if self._engine is None:
            return {"object": "list", "data": []}
        return await self._engine.models()

    async def info(self) -> dict[str, Any]:
        """What this replica serves and how it got there."""
        lo = self._loaded
        return {
            "slot": self._slot,
            "model": lo.cfg.model if lo else None,
            "version": lo.cfg.version if lo else None,
            "parked": lo.cfg.parked if lo else False,
            "fingerprint": lo.fingerprint if lo else None,
            "path": lo.cfg.path if lo else None,
            "model_dir": lo.model_dir if lo else None,
            "last_swap": asdict(self.last_swap) if self.last_swap else None,
            **_placement_of_this_replica(),
        }

    async def check_health(self) -> None:
        if self._engine is not None:
            try:
                await self._engine.check_health()
            except RayloopError:
                raise
            except Exception as e:
                raise EngineError(f"engine of slot {self._slot!r} is unhealthy: {e}") from e

    async def __del__(self) -> None:
        if self._engine is not None:
            await self._engine.shutdown()
            self._engine = None


async def _coalesce(stream: AsyncIterator[str], interval: Callable[[], float] = lambda: 0.0) -> AsyncIterator[str]:
    """Yield SSE events, joining those that piled up while the consumer was busy.

    ``interval()``, asked after every message, is how long the next one waits at least, joining what
    arrives meanwhile. The first message (the first token) and the end of the stream never wait.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def pump() -> None:
        try:
            async for chunk in stream:
                queue.put_nowait(chunk)
        except Exception as e:
            queue.put_nowait(e)
        finally:
            queue.put_nowait(_STREAM_END)
            ended.set()

    task = loop.create_task(pump())
    next_at = 0.0
    try:
        done = False
        while not done:
            parts = [await queue.get()]
            wait = next_at - loop.time()
            if wait > 0 and parts[0] is not _STREAM_END:
                try:
                    await asyncio.wait_for(ended.wait(), wait)
                except TimeoutError:
                    pass
            while not queue.empty():
                parts.append(queue.get_nowait())
            if parts[-1] is _STREAM_END:
                parts.pop()
                done = True
            for p in parts:
                if isinstance(p, Exception):
                    raise p
            if parts:
                yield "".join(parts)
                next_at = loop.time() + interval()
    finally:
        if not task.done():
            task.cancel()
