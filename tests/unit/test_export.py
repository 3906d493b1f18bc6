"""The HF export is written beside its target and renamed: a failure never leaves a half-written model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from rayloop.training import export


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = tmp_path / "base"
    model.save_pretrained(str(d), safe_serialization=True)
    (d / "tokenizer.json").write_text("{}")
    return d, {k: v.float() for k, v in model.state_dict().items()}


def test_export_writes_a_complete_model_and_replaces_an_old_one(
    tmp_path: Path, base: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, sd = base
    monkeypatch.setattr(export, "consolidated_state_dict", lambda ckpt, tag: sd)
    out = tmp_path / "models" / "candidate"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an earlier attempt")
    export.export_hf(tmp_path / "ckpt", "ds", base_dir, out, {"run": 1})
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "rayloop_training.json"} <= names
    assert "stale.txt" not in names
    assert [p.name for p in out.parent.iterdir()] == ["candidate"]


def test_a_failed_export_leaves_no_partial_directory(
    tmp_path: Path, base: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, sd = base
    monkeypatch.setattr(export, "consolidated_state_dict", lambda ckpt, tag: sd)

    def disk_full(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", disk_full)
    out = tmp_path / "models" / "candidate"
    with pytest.raises(OSError, match="No space left"):
        export.export_hf(tmp_path / "ckpt", "ds", base_dir, out, {"run": 1})
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary directory left behind either


class _Payload:
    """Stands for anything a tampered checkpoint could make the unpickler build or call."""


def test_checkpoints_load_tensors_and_plain_data_only(tmp_path: Path) -> None:
    """A checkpoint comes from storage: DeepSpeed's consolidation runs with weights-only loads."""
    import pickle

    import torch

    from rayloop.training.export import _weights_only_loads

    bad = tmp_path / "optim_states.pt"
    torch.save({"state": torch.zeros(2), "extra": _Payload()}, bad)
    with _weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="_Payload"):
        torch.load(bad, map_location="cpu", weights_only=False)  # what DeepSpeed asks for: refused anyway
    good = tmp_path / "model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "x"}, good)
    with _weights_only_loads():
        assert torch.load(good, map_location="cpu", weights_only=False)["module"]["w"].sum() == 2
    assert torch.load(bad, map_location="cpu", weights_only=False)["extra"].__class__ is _Payload  # restored after
