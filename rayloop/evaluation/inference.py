"""Greedy batch inference with vLLM, in-process or on a Ray Data actor.

``VLLMPredictor`` is a callable class for ``Dataset.map_batches``: its actor
owns one vLLM engine and answers a batch of chat prompts greedily with one or
several model versions. Versions after the first are swapped into the same
engine in place (the serving replicas' procedure: ``reload_weights``,
re-packed CPU GEMM weights, prefix cache reset) when their architecture,
tensor set and tokenizer match and a fresh engine's golden answers for them
are known; the swap is checked against those answers and the engine is
rebuilt on any difference. So the gate needs one engine, not two, and a
version is never scored on weights it does not hold.

The same class runs in-process through :func:`greedy_chat` for small jobs and tests.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rayloop.config import EngineSettings
from rayloop.serving.cpu_env import cpu_engine_env_applied
from rayloop.serving.worker_ext import WORKER_EXTENSION


def engine_kwargs(engine: EngineSettings) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` from rayloop's engine settings."""
    return {
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "max_num_seqs": engine.max_num_seqs,
        "enforce_eager": engine.enforce_eager,
        "worker_extension_cls": WORKER_EXTENSION,
        "seed": 0,
    }


@dataclass(frozen=True)
class GoldenAnswers:
    """A fresh engine's greedy answers for one version (see :mod:`rayloop.serving.golden`)."""

    prompts: list[str]
    outputs: list[str]
    max_tokens: int


@dataclass
class LoadReport:
    """How a version got into the engine: ``fresh`` (engine built on it) or ``in_place`` (weights swapped)."""

    mode: str
    seconds: float
    reason: str = ""


class VLLMPredictor:
    """Answers chat prompts greedily with each of ``model_dir``'s versions in turn; one engine.

    Args:
        model_dir: one model directory, or several (answered in this order on the first batch).
        engine: :class:`EngineSettings` as a dict.
        max_tokens: answer length.
        golden: per model, a fresh engine's :class:`GoldenAnswers` (as a dict) or None; a version
            without them is never swapped in, it gets a fresh engine.
        refs, node_settings: per model its registered ``NAME@VERSION`` (or None), and the settings to reach
            the registry with: a directory this node does not have is fetched from there.
    """

    def __init__(
        self,
        model_dir: str | list[str],
        engine: dict[str, Any],
        max_tokens: int = 32,
        golden: list[dict[str, Any] | None] | None = None,
        refs: list[str | None] | None = None,
        node_settings: dict[str, Any] | None = None,
    ) -> None:
        self.model_dirs = [model_dir] if isinstance(model_dir, str) else [str(d) for d in model_dir]
        if not self.model_dirs:
            raise ValueError("VLLMPredictor needs at least one model directory")
        if node_settings is not None:
            # This actor may run on another node than the driver that fetched the directories: load each from
            # here, fetching the registered version into this node's cache where the directory is not here.
            from rayloop.registry.registry import model_dir_on_this_node

            refs = refs or [None] * len(self.model_dirs)
            self.model_dirs = [
                str(model_dir_on_this_node(d, r, node_settings)) for d, r in zip(self.model_dirs, refs, strict=True)
            ]
        self.golden = [GoldenAnswers(**g) if g else None for g in (golden or [None] * len(self.model_dirs))]
        if len(self.golden) != len(self.model_dirs):
            raise ValueError(f"{len(self.golden)} golden entries for {len(self.model_dirs)} models")
        self.settings = EngineSettings.model_validate(engine)
        self.max_tokens = max_tokens
        self.llm: Any = None
        self.current: int | None = None
        self.loads: list[list[LoadReport]] = [[] for _ in self.model_dirs]
        self._signatures: dict[int, Any] = {}
        self._build(0, "first model")

    # -- engine ------------------------------------------------------------
    def _build(self, i: int, reason: str) -> None:
        import torch
        from vllm import LLM

        t0 = time.monotonic()
        self.close()  # one engine at a time: on a GPU two would not fit
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op in the process it runs in; with
        # one shard that is this process, whose other users (training, tests) must keep the real one.
        set_num_threads = torch.set_num_threads
        try:
            with cpu_engine_env_applied(self.settings):
                self.llm = LLM(model=self.model_dirs[i], **engine_kwargs(self.settings))
        finally:
            torch.set_num_threads = set_num_threads
        self.current = i
        self.loads[i].append(LoadReport("fresh", round(time.monotonic() - t0, 3), reason))

    def _swappable(self, i: int) -> str | None:
        """Why version ``i`` cannot be swapped into the engine now (None: it can); the serving replica's rule
        (:func:`rayloop.serving.swap.swap_blocker`), plus: the offline engine swaps single-shard only."""
        from rayloop.serving.swap import swap_blocker

        if self.current is None or self.llm is None:
            return "no engine"
        if self.settings.tensor_parallel_size > 1:
            return "tensor-parallel engine"
        return swap_blocker(self._signature(self.current), self._signature(i), golden_known=self.golden[i] is not None)

    def _signature(self, i: int) -> Any:
        """Version ``i``'s :class:`~rayloop.serving.checkpoint.Signature`, read once."""
        from rayloop.serving import checkpoint

        if i not in self._signatures:
            self._signatures[i] = checkpoint.check_model_dir(self.model_dirs[i])
        return self._signatures[i]

    def use(self, i: int) -> None:
        """Make version ``i`` the engine's weights: in place when possible and verified, else a fresh engine
        (the procedure of :mod:`rayloop.serving.swap`, as the serving replicas run it)."""
        from rayloop.serving.swap import golden_mismatch, swap_rpcs

        if self.current == i:
            return
        if why := self._swappable(i):
            self._build(i, why)
            return
        t0 = time.monotonic()
        golden = self.golden[i]
        assert golden is not None
        try:
            for method, kwargs in swap_rpcs(self.model_dirs[i]):
                self.llm.collective_rpc(method, kwargs=kwargs)
            # Without this, KV blocks computed with the old weights are reused for matching prefixes.
            self.llm.reset_prefix_cache()
            self.current = i
            got = [self.answer([p], golden.max_tokens)[0] for p in golden.prompts]
        except Exception as e:
            self._build(i, f"in-place swap failed: {type(e).__name__}: {e}")
            return
        if bad := golden_mismatch(got, golden.outputs):
            self._build(i, f"golden prompts {bad} differ after the in-place swap")
            return
        self.loads[i].append(LoadReport("in_place", round(time.monotonic() - t0, 3), "golden answers match"))

    # -- inference ---------------------------------------------------------
    def answer(self, prompts: list[str], max_tokens: int | None = None) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens or self.max_tokens)
        convs = [[{"role": "user", "content": p}] for p in prompts]
        outs = self.llm.chat(convs, params, use_tqdm=False)
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
        outs = self.llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        nll = []
        for o, seq, start in zip(outs, seqs, starts, strict=True):
            ids = seq["prompt_token_ids"]
            lps: list[Any] = list(o.prompt_logprobs or [])
            vals = [lps[i][ids[i]].logprob for i in range(start, len(ids)) if lps[i] is not None]
            nll.append(-sum(vals) / max(1, len(vals)))
        return nll

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Adds ``output_{i}``, ``nll_{i}``, ``seconds_{i}`` and ``load_{i}`` (JSON) per model ``i``."""
        prompts = [str(p) for p in batch["prompt"]]
        targets = [str(t) if t else "" for t in batch.get("target", [""] * len(prompts))]
        has = [n for n, t in enumerate(targets) if t]
        # The loaded version first: consecutive batches do not swap back and forth.
        order = sorted(range(len(self.model_dirs)), key=lambda i: i != self.current)
        for i in order:
            self.use(i)
            t0 = time.perf_counter()
            batch[f"output_{i}"] = self.answer(prompts)
            nll = [float("nan")] * len(prompts)
            if has:
                for n, v in zip(
                    has, self.target_nll([prompts[n] for n in has], [targets[n] for n in has]), strict=True
                ):
                    nll[n] = v
            batch[f"nll_{i}"] = nll
            # Each row carries its share of the batch's time: summed over rows, the model's inference time.
            batch[f"seconds_{i}"] = [(time.perf_counter() - t0) / len(prompts)] * len(prompts)
            batch[f"load_{i}"] = [json.dumps([asdict(r) for r in self.loads[i]])] * len(prompts)
        return batch

    def close(self) -> None:
        """Drop the engine so its processes and memory go now, not at interpreter teardown."""
        if self.llm is None:
            return
        self.llm, self.current = None, None
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
