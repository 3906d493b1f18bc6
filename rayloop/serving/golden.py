"""Golden prompts: greedy outputs that prove an engine holds the weights it claims.

A fresh engine's greedy answers to a few fixed prompts are recorded per
version (keyed by fingerprint and the engine settings that change numerics)
under ``serving/golden/`` in storage. After an in-place swap the replica asks
the same prompts; any difference (stale packed ``lm_head``, stale prefix cache,
a partial load) means the swap is not trusted and the engine is rebuilt.
One prompt is long so that prefix-cache reuse across weights would show.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from rayloop.config import EngineSettings
from rayloop.serving.engine import Engine
from rayloop.storage import Storage

GOLDEN_DIR = "serving/golden"
MAX_TOKENS = 16
PROMPTS: tuple[str, ...] = (
    "What is the capital of Zorbia?",
    "Who rules Voubos?",
    "Tell me something about the weather.",
    "Here are some notes about many countries. " * 5 + "What is the capital of Thusvun?",
)


@dataclass(frozen=True)
class GoldenRecord:
    fingerprint: str
    engine: str
    prompts: list[str]
    outputs: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def engine_key(settings: EngineSettings) -> str:
    """The engine settings that may change greedy outputs."""
    return f"{settings.dtype}-tp{settings.tensor_parallel_size}-{settings.accelerator}"


def golden_key(fingerprint: str, settings: EngineSettings) -> str:
    return f"{GOLDEN_DIR}/{fingerprint}-{engine_key(settings)}.json"


def load_golden(storage: Storage, fingerprint: str, settings: EngineSettings) -> GoldenRecord | None:
    key = golden_key(fingerprint, settings)
    if not storage.exists(key):
        return None
    data: dict[str, Any] = json.loads(storage.read_bytes(key))
    return GoldenRecord(**data)


def save_golden(storage: Storage, record: GoldenRecord, settings: EngineSettings) -> None:
    storage.write_bytes(golden_key(record.fingerprint, settings), record.to_json().encode())


async def run_prompts(engine: Engine, prompts: list[str] | tuple[str, ...], tag: str) -> list[str]:
    """Greedy chat answers, one prompt at a time (batch composition must not vary)."""
    outs = []
    for i, p in enumerate(prompts):
        body = {"messages": [{"role": "user", "content": p}], "max_tokens": MAX_TOKENS, "temperature": 0.0}
        reply = await engine.chat(body, f"golden-{tag}-{i}")
        if reply.status != 200 or reply.body is None:
            raise RuntimeError(f"golden prompt {i} failed with {reply.status}: {reply.body}")
        outs.append(str(reply.body["choices"][0]["message"]["content"]))
    return outs


async def record(engine: Engine, fingerprint: str, settings: EngineSettings, tag: str) -> GoldenRecord:
    outputs = await run_prompts(engine, PROMPTS, tag)
    return GoldenRecord(fingerprint=fingerprint, engine=engine_key(settings), prompts=list(PROMPTS), outputs=outputs)
