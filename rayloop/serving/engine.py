"""The ``Engine`` interface in front of vLLM, and what it returns.

A replica (:class:`rayloop.serving.server.LLMServer`) owns one engine. The
engine speaks the OpenAI protocol itself (``chat``/``completion`` take the
request body as a dict and return an :class:`EngineReply`), because vLLM
already implements that protocol (validation, chat templates, SSE chunks) and
rayloop reuses it instead of writing it again. ``generate`` is the low-level
path used for golden-prompt checks. Two implementations ship:

- :class:`rayloop.serving.vllm_engine.VLLMEngine`: vLLM's ``AsyncLLM`` plus its
  ``OpenAIServingChat``/``OpenAIServingCompletion``.
- :class:`rayloop.serving.fake_engine.FakeEngine`: deterministic, no model, for
  fast unit tests; passed in with ``engine_cls=``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rayloop.config import EngineSettings


@dataclass
class RequestStats:
    """Filled by the engine while it answers one request (for capture and metrics)."""

    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""  # the first choice's completion text
    # Every choice's text, by (generate call, output index): n > 1 and batch prompts give several.
    choices: dict[tuple[int, int], str] = field(default_factory=dict)
    calls: int = 0

    def choice_texts(self) -> list[str]:
        """Each choice's own text, in order (prompt, then choice index); ``[text]`` when none were tapped."""
        return [self.choices[k] for k in sorted(self.choices)] if self.choices else [self.text]

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.started) * 1000.0


@dataclass
class EngineReply:
    """One OpenAI response: a JSON body (full answer or error) or an SSE stream.

    ``stream`` yields complete SSE events (``"data: {...}\\n\\n"``, ending with
    ``"data: [DONE]\\n\\n"``); ``stats`` is complete once the stream is exhausted.
    """

    status: int
    body: dict[str, Any] | None = None
    stream: AsyncIterator[str] | None = None
    stats: RequestStats = field(default_factory=RequestStats)


@dataclass(frozen=True)
class Greedy:
    """Greedy output of one prompt: what golden-prompt checks compare."""

    text: str
    token_ids: tuple[int, ...]


@runtime_checkable
class Engine(Protocol):
    """What a replica needs from an inference engine."""

    async def start(self, model_dir: str, settings: EngineSettings, served_names: list[str]) -> None:
        """Load ``model_dir``; responses name the model ``served_names[0]``."""

    async def chat(self, body: dict[str, Any], request_id: str) -> EngineReply:
        """Answer an OpenAI chat-completions request body."""

    async def completion(self, body: dict[str, Any], request_id: str) -> EngineReply:
        """Answer an OpenAI completions request body."""

    def generate(self, prompt: str | list[int], max_tokens: int, request_id: str) -> AsyncIterator[Greedy]:
        """Greedy generation; yields the cumulative output as it grows."""

    async def reload_weights(self, model_dir: str) -> None:
        """Swap in the weights of ``model_dir`` (same architecture and shapes) without restarting."""

    def set_served_names(self, names: list[str]) -> None:
        """Rename the served model (after an in-place version swap)."""

    async def models(self) -> dict[str, Any]:
        """The OpenAI ``/v1/models`` list."""

    async def check_health(self) -> None:
        """Raise if the engine is dead."""

    async def shutdown(self) -> None:
        """Stop the engine and free its memory."""


async def greedy(engine: Engine, prompt: str | list[int], max_tokens: int, request_id: str) -> Greedy:
    """Run one greedy generation to the end."""
    last = Greedy("", ())
    async for out in engine.generate(prompt, max_tokens, request_id):
        last = out
    return last
