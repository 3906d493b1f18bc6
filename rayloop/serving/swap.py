"""The in-place weight swap, defined once for the serving replica and the validation gate.

Both keep one vLLM engine and move it to another version without rebuilding it: the replica's
:class:`~rayloop.serving.vllm_engine.VLLMEngine` (``AsyncLLM``, while it serves) and the gate's
:class:`~rayloop.evaluation.inference.VLLMPredictor` (the offline ``LLM``, between versions it
scores). They share:

- **when** a swap may be tried (:func:`swap_blocker`): same architecture, tensor set and tokenizer
  (:class:`~rayloop.serving.checkpoint.Signature`), and a fresh engine's golden answers for the target
  on record to check the swap against;
- **how** it is done (:func:`swap_rpcs` then a prefix-cache reset): vLLM's ``reload_weights`` from the
  checkpoint, then the worker extension re-packs the CPU GEMM weights (a tied ``lm_head`` keeps stale
  packed weights otherwise); the prefix cache is reset so no KV block computed with the old weights is
  reused;
- **how it is verified** (:func:`golden_mismatch`): the golden prompts' greedy answers must equal the
  fresh engine's, else the engine is rebuilt on the target (never scored or served on weights it does
  not hold).
"""

from __future__ import annotations

from typing import Any

NO_GOLDEN = "no golden answers from a fresh engine of this version to check a swap against"


def swap_rpcs(model_dir: str) -> list[tuple[str, dict[str, Any] | None]]:
    """The ``collective_rpc`` calls that load ``model_dir``'s weights into a running engine, in order."""
    return [
        ("reload_weights", {"weights_path": model_dir, "is_checkpoint_format": True}),
        ("rayloop_redispatch_cpu_gemm", None),
    ]


def swap_blocker(current: Any, target: Any, *, golden_known: bool) -> str | None:
    """Why an engine holding ``current`` cannot be swapped to ``target`` in place (None: it can be tried).

    ``current``/``target`` are :class:`~rayloop.serving.checkpoint.Signature` (None: no engine yet)."""
    if current is None:
        return "first load"
    if diffs := current.differences(target):
        return "; ".join(diffs)
    if not golden_known:
        return NO_GOLDEN
    return None


def golden_mismatch(got: list[str], expected: list[str]) -> list[int]:
    """Indices of the golden prompts whose answer after a swap differs from the fresh engine's."""
    if len(got) != len(expected):
        return list(range(max(len(got), len(expected))))
    return [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
