"""Greedy batch inference with vLLM, in-process or spread over Ray Data actors.

``VLLMPredictor`` is a callable class for ``Dataset.map_batches``: each actor
owns one vLLM engine and answers a batch of chat prompts greedily. The same
class runs in-process through :func:`greedy_chat` for small jobs and tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rayloop.config import EngineSettings


def engine_kwargs(engine: EngineSettings) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` from rayloop's engine settings."""
    return {
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "max_num_seqs": engine.max_num_seqs,
        "enforce_eager": engine.enforce_eager,
        "seed": 0,
    }


class VLLMPredictor:
    """Answers chat prompts greedily; ``batch["messages"]`` holds one user question per row."""

    def __init__(self, model_dir: str, engine: dict[str, Any], max_tokens: int = 32) -> None:
        settings = EngineSettings.model_validate(engine)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(settings.kv_cache_gib))))
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=str(model_dir), **engine_kwargs(settings))
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def answer(self, prompts: list[str]) -> list[str]:
        convs = [[{"role": "user", "content": p}] for p in prompts]
        outs = self.llm.chat(convs, self.params, use_tqdm=False)  # type: ignore[arg-type]
        return [o.outputs[0].text for o in outs]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch["output"] = self.answer([str(p) for p in batch["prompt"]])
        return batch

    def close(self) -> None:
        # Drop the engine so its processes exit now, not at interpreter teardown.
        del self.llm
        import gc

        gc.collect()


def greedy_chat(
    model_dir: str | Path, prompts: list[str], engine: EngineSettings | None = None, max_tokens: int = 32
) -> list[str]:
    """Answer ``prompts`` with one in-process vLLM engine, then shut it down."""
    p = VLLMPredictor(str(model_dir), (engine or EngineSettings()).model_dump(), max_tokens)
    try:
        return p.answer(prompts)
    finally:
        p.close()
