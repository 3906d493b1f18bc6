"""Greedy batch inference with vLLM, in-process or spread over Ray Data actors.

``VLLMPredictor`` is a callable class for ``Dataset.map_batches``: each actor
owns one vLLM engine and answers a batch of chat prompts greedily. The same
class runs in-process through :func:`greedy_chat` for small jobs and tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rayloop.config import EngineSettings
from rayloop.serving.cpu_env import cpu_engine_env_applied


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
        import torch
        from vllm import LLM, SamplingParams

        # vLLM's CPU worker replaces torch.set_num_threads with a no-op in the process it runs in; with
        # one shard that is this process, whose other users (training, tests) must keep the real one.
        set_num_threads = torch.set_num_threads
        try:
            with cpu_engine_env_applied(settings):
                self.llm = LLM(model=str(model_dir), **engine_kwargs(settings))
        finally:
            torch.set_num_threads = set_num_threads
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def answer(self, prompts: list[str]) -> list[str]:
        convs = [[{"role": "user", "content": p}] for p in prompts]
        outs = self.llm.chat(convs, self.params, use_tqdm=False)  # type: ignore[arg-type]
        return [o.outputs[0].text for o in outs]

    def target_nll(self, prompts: list[str], targets: list[str]) -> list[float]:
        """Mean negative log-likelihood per token of each target answer after its prompt."""
        from vllm import SamplingParams

        tok: Any = self.llm.get_tokenizer()
        seqs, starts = [], []
        for p, t in zip(prompts, targets, strict=True):
            chat = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            p_ids = tok(chat, add_special_tokens=False)["input_ids"]
            t_ids = tok(t + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
            seqs.append({"prompt_token_ids": p_ids + t_ids})
            starts.append(len(p_ids))
        outs = self.llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)  # type: ignore[arg-type]
        nll = []
        for o, seq, start in zip(outs, seqs, starts, strict=True):
            ids = seq["prompt_token_ids"]
            lps: list[Any] = list(o.prompt_logprobs or [])
            vals = [lps[i][ids[i]].logprob for i in range(start, len(ids)) if lps[i] is not None]
            nll.append(-sum(vals) / max(1, len(vals)))
        return nll

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import time

        prompts = [str(p) for p in batch["prompt"]]
        t0 = time.perf_counter()
        batch["output"] = self.answer(prompts)
        batch["batch_seconds"] = [time.perf_counter() - t0] * len(prompts)
        targets = [str(t) if t else "" for t in batch.get("target", [""] * len(prompts))]
        has = [i for i, t in enumerate(targets) if t]
        nll = [float("nan")] * len(prompts)
        if has:
            for i, v in zip(has, self.target_nll([prompts[i] for i in has], [targets[i] for i in has]), strict=True):
                nll[i] = v
        batch["nll"] = nll
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
