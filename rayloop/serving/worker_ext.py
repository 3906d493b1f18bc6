"""Methods mixed into vLLM's worker (``--worker-extension-cls``), callable by name with ``collective_rpc``.

Kept import-light: vLLM imports this module in every worker process.
"""

from __future__ import annotations

from typing import Any

# What vLLM's ``worker_extension_cls`` names: serving engines and the gate's evaluation engine.
WORKER_EXTENSION = "rayloop.serving.worker_ext.RayloopWorkerExtension"


class RayloopWorkerExtension:
    """Extra worker RPCs rayloop needs for in-place weight swaps."""

    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def rayloop_redispatch_cpu_gemm(self) -> int:
        """Re-pack the CPU GEMM weights of modules that kept their dense weight.

        On CPU, vLLM packs each linear layer's weight for its GEMM kernel at load
        time. ``reload_weights`` re-runs that for layers it reloads, but a tied
        ``lm_head`` shares the embedding's tensor and is never reloaded itself,
        so its packed copy keeps the old weights. Re-dispatching every module
        that has ``cpu_linear`` and still holds a 2-D weight fixes it; layers
        whose dense weight was dropped after packing are skipped (they were
        re-packed by the reload). Returns how many modules were re-packed.
        """
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        model = self.model_runner.get_model()
        n = 0
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not hasattr(module, "cpu_linear") or weight is None:
                continue
            if weight.ndim == 2 and weight.numel() > 0 and not weight.is_meta:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                n += 1
        return n
