"""DeepSpeed config from :class:`rayloop.config.TrainingSettings`.

>>> from rayloop.config import TrainingSettings
>>> cfg = build_ds_config(TrainingSettings(zero_stage=3), world_size=2, total_steps=100)
>>> cfg["train_batch_size"], cfg["zero_optimization"]["stage"]
(32, 3)
"""

from __future__ import annotations

from typing import Any

from rayloop.config import TrainingSettings


def bf16_enabled(ts: TrainingSettings) -> bool:
    """``bf16=None`` means on with GPUs, off on CPU (emulated bf16 matmuls are ~50x slower there)."""
    return ts.use_gpu if ts.bf16 is None else ts.bf16


def build_ds_config(ts: TrainingSettings, *, world_size: int, total_steps: int) -> dict[str, Any]:
    """A complete DeepSpeed config: ZeRO stage, bf16, batch sizes, AdamW and a warmup-cosine schedule."""
    zero: dict[str, Any] = {"stage": ts.zero_stage}
    if ts.zero_stage == 3:
        # Small models: gather whole layers at once; the default thresholds are for billions of params.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    return {
        "train_micro_batch_size_per_gpu": ts.micro_batch_size,
        "gradient_accumulation_steps": ts.gradient_accumulation_steps,
        "train_batch_size": ts.micro_batch_size * ts.gradient_accumulation_steps * world_size,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16_enabled(ts)},
        "zero_optimization": zero,
        # torch_adam: DeepSpeed's fused/CPU Adam needs a compiled op; torch's AdamW is
        # as fast for small models and works on every accelerator.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": ts.learning_rate, "betas": [0.9, 0.999], "weight_decay": 0.0, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, ts.warmup_steps + 1),
                "warmup_num_steps": max(1, ts.warmup_steps),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.1,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
