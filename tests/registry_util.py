"""Helpers for registry tests: tiny fake Hugging Face model directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def make_model_dir(
    path: Path, *, seed: int = 0, n: int = 64, shards: int = 1, extra: dict[str, bytes] | None = None
) -> Path:
    """Write config.json, tokenizer files and ``shards`` small safetensors files; return ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "seed": seed}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "seed": seed}))
    for i in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({"w": rng.standard_normal((n, 8)).astype(np.float32)}, str(path / name))
    for rel, data in (extra or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path
