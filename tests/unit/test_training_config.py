from __future__ import annotations

import pytest

from rayloop.config import TrainingSettings
from rayloop.errors import ConfigError, DataError
from rayloop.training.deepspeed_config import bf16_enabled, build_ds_config
from rayloop.training.retrain import resolve_config
from train_jobs._args import parse_sets


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_batch_arithmetic(stage: int) -> None:
    ts = TrainingSettings(zero_stage=stage, micro_batch_size=4, gradient_accumulation_steps=3)
    cfg = build_ds_config(ts, world_size=2, total_steps=50)
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["scheduler"]["params"]["total_num_steps"] == 50
    assert cfg["optimizer"]["params"]["torch_adam"] is True


def test_bf16_auto_follows_device() -> None:
    assert bf16_enabled(TrainingSettings()) is False
    assert bf16_enabled(TrainingSettings(use_gpu=True)) is True
    assert bf16_enabled(TrainingSettings(bf16=True)) is True


def test_resolve_config_counts_steps_and_rejects_tiny_snapshots(settings) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    manifest = {"counts": {"train_blocks": 100, "eval_blocks": 4}, "settings": {"block_size": 64}}
    cfg = resolve_config(settings, snapshot_id="abc", manifest=manifest, base_dir=Path("/m"), workers=2, zero_stage=3)
    ts = settings.training
    assert cfg["steps_per_epoch"] == (100 // 2) // (ts.micro_batch_size * ts.gradient_accumulation_steps)
    assert cfg["total_steps"] == cfg["steps_per_epoch"] * ts.epochs
    assert cfg["resolved"]["training"]["zero_stage"] == 3 and cfg["has_eval"]
    with pytest.raises(DataError, match="too few"):
        resolve_config(
            settings,
            snapshot_id="abc",
            manifest={"counts": {"train_blocks": 1}, "settings": {"block_size": 64}},
            base_dir=Path("/m"),
        )


def test_job_set_overrides() -> None:
    assert parse_sets(["training.epochs=3", "data.unrated=keep"]) == {
        "training": {"epochs": 3},
        "data": {"unrated": "keep"},
    }
    with pytest.raises(ConfigError):
        parse_sets(["nonsense"])
