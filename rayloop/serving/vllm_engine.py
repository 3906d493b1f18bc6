"""vLLM behind the :class:`~rayloop.serving.engine.Engine` interface.

The engine is vLLM's ``AsyncLLM`` with vLLM's own OpenAI serving classes on
top (built by ``init_app_state``, exactly as ``vllm serve`` builds them), so
request validation, chat templates, sampling defaults and SSE chunks are
vLLM's. rayloop only wraps the engine client to observe each request (first
token time, token counts, text) for capture and metrics.

In-place weight swaps follow the sequence measured safe on vLLM 0.32 (see the
serving issue): pause (waiting for in-flight requests), ``reload_weights``,
re-dispatch the packed CPU GEMM weights (tied embeddings keep a stale packed
``lm_head`` otherwise), reset the prefix cache, resume.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import logging.handlers
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from rayloop.config import EngineSettings
from rayloop.errors import EngineError
from rayloop.serving.engine import EngineReply, Greedy, RequestStats
from rayloop.serving.swap import swap_rpcs
from rayloop.serving.worker_ext import WORKER_EXTENSION

logger = logging.getLogger(__name__)

# The request being answered in this task: the observing wrapper records into
# it. A contextvar (not a dict keyed by vLLM's request id) because vLLM derives
# sub-request ids (``chatcmpl-<id>_<i>``) that we would have to re-parse.
_CURRENT: contextvars.ContextVar[RequestStats | None] = contextvars.ContextVar("rayloop_request_stats", default=None)


class _ObservedEngineClient:
    """Forwards everything to ``AsyncLLM``; taps ``generate`` outputs into the current :class:`RequestStats`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        stats = _CURRENT.get()
        call = 0
        if stats is not None:  # one call per prompt (a batch of prompts makes several)
            call, stats.calls = stats.calls, stats.calls + 1
        return self._observe(self._inner.generate(*args, **kwargs), stats, call)

    @staticmethod
    async def _observe(gen: AsyncIterator[Any], stats: RequestStats | None, call: int) -> AsyncIterator[Any]:
        async for out in gen:
            if stats is not None:
                if out.prompt_token_ids is not None and stats.prompt_tokens is None:
                    stats.prompt_tokens = len(out.prompt_token_ids)
                if out.outputs:
                    first = out.outputs[0]
                    if first.token_ids and stats.first_token_at is None:
                        stats.first_token_at = time.monotonic()
                    # Streaming requests use DELTA outputs, full ones FINAL_ONLY: add either way.
                    stats.completion_tokens += sum(len(o.token_ids) for o in out.outputs)
                    if call == 0:
                        stats.text += first.text
                    for o in out.outputs:
                        key = (call, o.index)
                        stats.choices[key] = stats.choices.get(key, "") + o.text
                    if first.finish_reason is not None:
                        stats.finish_reason = first.finish_reason
            yield out


def _engine_argv(model_dir: str, settings: EngineSettings, served_names: list[str]) -> list[str]:
    argv = [
        "--model",
        model_dir,
        "--served-model-name",
        *served_names,
        "--dtype",
        settings.dtype,
        "--max-model-len",
        str(settings.max_model_len),
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--worker-extension-cls",
        WORKER_EXTENSION,
        "--disable-log-stats",
        "--seed",
        "0",
    ]
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    if settings.accelerator == "gpu":
        argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
        if settings.tensor_parallel_size > 1:
            # Inside a Serve replica the shards go to Ray actors in the replica's placement group.
            argv += ["--distributed-executor-backend", "ray"]
    return argv


def _error_body(
    status: int, message: str, err_type: str = "BadRequestError", param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def _validation_error(exc: Exception) -> dict[str, Any]:
    """An OpenAI-style 400 naming the offending field (vLLM's own formatting of the loc)."""
    from vllm.entrypoints.serve.exception_handling.handlers.validation import clean_loc_for_param

    errors = exc.errors()  # type: ignore[attr-defined]
    parts = []
    for e in errors[:5]:
        loc = clean_loc_for_param(tuple(e.get("loc", ())))
        value = e.get("input")
        shown = value if isinstance(value, int | float | bool) or value is None else str(value)[:80]
        parts.append(f"{loc or '(body)'}: {e.get('msg')} (got {shown!r})")
    param = clean_loc_for_param(tuple(errors[0].get("loc", ()))) if errors else None
    return _error_body(400, "invalid request: " + "; ".join(parts), param=param)


@contextmanager
def serve_log_kept(logger_name: str = "ray.serve") -> Iterator[None]:
    """Keep Serve's replica log working through vLLM's logging setup.

    vLLM applies its logging config with ``logging.config.dictConfig``, which closes every handler in the
    process, those of Serve's replica logger included: the buffer Serve logs through (a ``MemoryHandler``)
    loses its target file. The replica's Serve log then ends there, and a Serve controller that starts again
    (after the head died and came back) cannot recover the replica: it asks the replica for its log file,
    the replica raises, and Serve stops a replica that was serving. Put the targets back after (a closed file
    handler opens its file again, in append mode, on the next record)."""
    kept = [
        (h, h.target)
        for h in logging.getLogger(logger_name).handlers
        if isinstance(h, logging.handlers.MemoryHandler) and h.target is not None
    ]
    try:
        yield
    finally:
        for handler, target in kept:
            if handler.target is None:
                handler.setTarget(target)


class VLLMEngine:
    """vLLM ``AsyncLLM`` + vLLM's OpenAI serving classes."""

    def __init__(self) -> None:
        self._llm: Any = None
        self._state: Any = None
        self._model_dir: str | None = None

    async def start(self, model_dir: str, settings: EngineSettings, served_names: list[str]) -> None:
        with serve_log_kept():
            await self._start(model_dir, settings, served_names)

    async def _start(self, model_dir: str, settings: EngineSettings, served_names: list[str]) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        from rayloop.serving.cpu_env import cpu_engine_env_applied

        parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
        args = parser.parse_args(_engine_argv(model_dir, settings, served_names))
        engine_args = AsyncEngineArgs.from_cli_args(args)

        stat_loggers: list[Any] | None = None
        if settings.log_stats:
            # vLLM's engine statistics (KV-cache use, queue, preemptions, ...) through Ray's metrics, tagged with
            # the Serve replica's id (ReplicaId), as Ray Serve LLM exports them.
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            stat_loggers = [RayPrometheusStatLogger]

        def build() -> Any:
            with cpu_engine_env_applied(settings):
                vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
                return AsyncLLM.from_vllm_config(
                    vllm_config=vllm_config,
                    usage_context=UsageContext.OPENAI_API_SERVER,
                    stat_loggers=stat_loggers,
                    disable_log_stats=not settings.log_stats,
                )

        try:
            # In a thread: starting the engine blocks for tens of seconds (process spawn, handshake), and
            # the replica's event loop must keep answering meanwhile. AsyncLLM built outside a running loop
            # starts its output tasks lazily, on the first request.
            self._llm = await asyncio.to_thread(build)
        except Exception as e:
            raise EngineError(f"vLLM failed to start on {model_dir!r}: {e}") from e
        client = _ObservedEngineClient(self._llm)
        state = State()
        await init_app_state(client, state, args, supported_tasks=await self._llm.get_supported_tasks())  # type: ignore[arg-type]
        self._state = state
        self._model_dir = model_dir

    # -- OpenAI ------------------------------------------------------------
    async def chat(self, body: dict[str, Any], request_id: str) -> EngineReply:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return await self._serve(
            ChatCompletionRequest, self._state.openai_serving_chat.create_chat_completion, body, request_id
        )

    async def completion(self, body: dict[str, Any], request_id: str) -> EngineReply:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return await self._serve(
            CompletionRequest, self._state.openai_serving_completion.create_completion, body, request_id
        )

    async def _serve(self, model: Any, create: Any, body: dict[str, Any], request_id: str) -> EngineReply:
        from pydantic import ValidationError
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError

        stats = RequestStats()
        try:
            request = model.model_validate(body)
        except ValidationError as e:
            return EngineReply(status=400, body=_validation_error(e), stats=stats)
        except VLLMClientError as e:  # vLLM's own request checks (a completion without a prompt, ...)
            param = getattr(e, "parameter", None)
            status = 404 if type(e).__name__ == "VLLMNotFoundError" else 400
            err_type = "NotFoundError" if status == 404 else "BadRequestError"
            return EngineReply(
                status=status, body=_error_body(status, f"invalid request: {e}", err_type, param), stats=stats
            )
        except Exception as e:
            # Validating a request depends on the body alone: whatever fails here is the client's input.
            msg = f"invalid request body: {type(e).__name__}: {e}"[:500]
            return EngineReply(status=400, body=_error_body(400, msg), stats=stats)
        request.request_id = request_id
        token = _CURRENT.set(stats)
        try:
            result = await create(request, None)
        except Exception as e:  # vLLM raises for some bad inputs instead of returning an ErrorResponse
            from vllm.entrypoints.serve import create_error_response

            err = create_error_response(e)
            return EngineReply(status=err.error.code, body=err.model_dump(), stats=stats)
        finally:
            _CURRENT.reset(token)
        if isinstance(result, ErrorResponse):
            return EngineReply(status=result.error.code, body=result.model_dump(), stats=stats)
        if hasattr(result, "model_dump"):
            return EngineReply(status=200, body=result.model_dump(mode="json", exclude_none=True), stats=stats)
        return EngineReply(status=200, stream=self._stream(result, stats), stats=stats)

    @staticmethod
    async def _stream(gen: AsyncIterator[str], stats: RequestStats) -> AsyncIterator[str]:
        token = _CURRENT.set(stats)
        try:
            async for chunk in gen:
                yield chunk
        finally:
            _CURRENT.reset(token)

    async def models(self) -> dict[str, Any]:
        listing = await self._state.openai_serving_models.show_available_models()
        return dict(listing.model_dump(mode="json"))

    def set_served_names(self, names: list[str]) -> None:
        from vllm.entrypoints.openai.models.protocol import BaseModelPath

        paths = self._state.openai_serving_models.base_model_paths
        # Mutate the list in place: the serving classes and the model registry share it.
        paths[:] = [BaseModelPath(name=n, model_path=self._model_dir or "") for n in names]

    # -- low level ---------------------------------------------------------
    async def generate(self, prompt: str | list[int], max_tokens: int, request_id: str) -> AsyncIterator[Greedy]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.CUMULATIVE)
        if isinstance(prompt, str):
            ids = self._llm.get_tokenizer().encode(prompt)
        else:
            ids = list(prompt)
        async for out in self._llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id):
            o = out.outputs[0]
            yield Greedy(text=o.text, token_ids=tuple(o.token_ids))

    async def reload_weights(self, model_dir: str) -> None:
        llm = self._llm
        t0 = time.monotonic()
        # "wait" lets in-flight requests finish on the old weights; new ones queue until resume.
        await llm.pause_generation(mode="wait", clear_cache=True)
        try:
            for method, kwargs in swap_rpcs(model_dir):
                await llm.collective_rpc(method, kwargs=kwargs)
            # Without this, KV blocks computed with the old weights are reused for matching prefixes.
            await llm.reset_prefix_cache()
        finally:
            await llm.resume_generation()
        self._model_dir = model_dir
        logger.info("reloaded weights from %s in %.1f ms", model_dir, (time.monotonic() - t0) * 1000)

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineError("engine not started")
        await self._llm.check_health()

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm, self._state = self._llm, None, None
            await asyncio.to_thread(llm.shutdown)  # blocks while engine processes exit


def dumps_body(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))
