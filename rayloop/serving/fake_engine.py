"""A deterministic :class:`~rayloop.serving.engine.Engine` without a model, for fast unit tests.

Two magic prompts: ``__raise__`` makes the engine raise (engine failure),
``__sleep__`` takes two seconds (overload).

Answers are a function of the prompt and of the weights file's content (so a
weight swap changes them), and follow the OpenAI response shapes. Pass it to a
replica with ``engine_cls="rayloop.serving.fake_engine:FakeEngine"``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rayloop.config import EngineSettings
from rayloop.errors import EngineError
from rayloop.serving.engine import EngineReply, Greedy, RequestStats
from rayloop.serving.protocol import openai_error


def _weights_salt(model_dir: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()[:8]


class FakeEngine:
    """Echo-style engine: the answer is ``"<salt>:<reversed prompt words>"`` cut to ``max_tokens`` words."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._salt = ""
        self._started = False
        self._settings = EngineSettings()
        self.reloads = 0

    async def start(self, model_dir: str, settings: EngineSettings, served_names: list[str]) -> None:
        self._salt = _weights_salt(model_dir)
        self._names = list(served_names)
        self._settings = settings
        self._started = True

    def _answer(self, prompt: str, max_tokens: int) -> list[str]:
        words = [self._salt + ":", *reversed(prompt.split())]
        return words[:max_tokens]

    def _check(self, body: dict[str, Any], key: str) -> tuple[str, int] | dict[str, Any]:
        if not isinstance(body, dict):
            return openai_error(400, "body must be a JSON object", "BadRequestError")
        model = body.get("model")
        if model is not None and model not in self._names:
            return openai_error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return openai_error(
                400, f"max_tokens must be at least 1, got {max_tokens}.", "BadRequestError", "max_tokens"
            )
        if max_tokens > self._settings.max_model_len:
            return openai_error(400, f"max_tokens={max_tokens} > max_model_len", "BadRequestError", "max_tokens")
        if key == "messages":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return openai_error(400, "messages: Input should be a valid list", "BadRequestError", "messages")
            prompt = " ".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
        else:
            raw = body.get("prompt")
            if not isinstance(raw, str):
                return openai_error(400, "prompt: Input should be a valid string", "BadRequestError", "prompt")
            prompt = raw
        if len(prompt.split()) > self._settings.max_model_len:
            return openai_error(400, "prompt is longer than the context", "BadRequestError", "input_tokens")
        return prompt, max_tokens

    async def chat(self, body: dict[str, Any], request_id: str) -> EngineReply:
        return await self._reply(body, request_id, "messages")

    async def completion(self, body: dict[str, Any], request_id: str) -> EngineReply:
        return await self._reply(body, request_id, "prompt")

    async def _reply(self, body: dict[str, Any], request_id: str, key: str) -> EngineReply:
        stats = RequestStats()
        checked = self._check(body, key)
        if isinstance(checked, dict):
            return EngineReply(status=int(checked["error"]["code"]), body=checked, stats=stats)
        prompt, max_tokens = checked
        words = self._answer(prompt, max_tokens)
        if prompt == "__raise__":
            raise EngineError("fake engine failure requested")
        if prompt == "__sleep__":  # a slow request, for overload tests
            await asyncio.sleep(2.0)
        stats.prompt_tokens = len(prompt.split())
        stats.first_token_at = time.monotonic()
        stats.completion_tokens = len(words)
        stats.text = " ".join(words)
        stats.finish_reason = "length" if len(words) == max_tokens else "stop"
        chat = key == "messages"
        rid = ("chatcmpl-" if chat else "cmpl-") + request_id
        if not body.get("stream"):
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": stats.text},
                    "finish_reason": stats.finish_reason,
                }
                if chat
                else {"index": 0, "text": stats.text, "finish_reason": stats.finish_reason}
            )
            usage = {
                "prompt_tokens": stats.prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": stats.prompt_tokens + len(words),
            }
            obj = "chat.completion" if chat else "text_completion"
            out = {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": self._names[0],
                "choices": [choice],
                "usage": usage,
            }
            return EngineReply(status=200, body=out, stats=stats)
        return EngineReply(status=200, stream=self._stream(rid, words, chat, stats), stats=stats)

    async def _stream(self, rid: str, words: list[str], chat: bool, stats: RequestStats) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        for i, w in enumerate(words):
            await asyncio.sleep(0)
            text = w if i == 0 else " " + w
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            choice["finish_reason"] = stats.finish_reason if i == len(words) - 1 else None
            yield (
                "data: " + json.dumps({"id": rid, "object": obj, "model": self._names[0], "choices": [choice]}) + "\n\n"
            )
        yield "data: [DONE]\n\n"

    async def generate(self, prompt: str | list[int], max_tokens: int, request_id: str) -> AsyncIterator[Greedy]:
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        words = self._answer(text, max_tokens)
        for i in range(1, len(words) + 1):
            yield Greedy(" ".join(words[:i]), tuple(range(i)))

    async def reload_weights(self, model_dir: str) -> None:
        self._salt = _weights_salt(model_dir)
        self.reloads += 1

    def set_served_names(self, names: list[str]) -> None:
        self._names = list(names)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "rayloop"} for n in self._names]}

    async def check_health(self) -> None:
        if not self._started:
            raise EngineError("fake engine not started")

    async def shutdown(self) -> None:
        self._started = False
