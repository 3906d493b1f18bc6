"""Helpers for the serving integration tests: model variants and Serve addresses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.integration.registry_servers import free_port as free_port  # one port picker for every test


def make_variant(src: Path, dst: Path, *, seed: int, scale: float = 0.5, tie: bool = False) -> Path:
    """Copy a model directory with perturbed weights (same shapes), optionally with tied embeddings.

    ``scale`` is the noise std relative to each tensor's std; 0 keeps the weights.
    """
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
    tensors = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        if tie and name == "lm_head.weight":
            continue
        if scale and t.ndim == 2:
            t = t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * t.std() * scale
        out[name] = t.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = tie
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def make_larger(src: Path, dst: Path, *, hidden: int, layers: int, intermediate: int) -> Path:
    """A randomly initialised model of the same family and tokenizer as ``src``, but larger (so slower).

    Stands in for a real regression of the "bigger model, same quality" kind: it answers (nonsense),
    only more slowly per token.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        skip = p.suffix == ".safetensors" or p.name in ("config.json", "rayloop_build.json") or p.name.startswith(".")
        if p.is_file() and not skip:
            shutil.copy2(p, dst / p.name)
    cfg = json.loads((src / "config.json").read_text())
    heads = hidden // cfg["head_dim"]
    cfg.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dst)
    return dst


def serve_http_url() -> str:
    """Base URL of the running Serve HTTP proxy (whoever started Serve chose the port)."""
    from ray.serve._private.api import _get_global_client

    client = _get_global_client()
    assert client is not None
    opts = client.get_serve_details()["http_options"]
    host = opts.get("host") or "127.0.0.1"
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{opts['port']}"
