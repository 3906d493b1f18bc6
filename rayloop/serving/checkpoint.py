"""Check a model directory before an engine touches it.

A bad ``weights_path`` kills a running vLLM engine, and a checkpoint missing
some tensors silently yields a mixed model after ``reload_weights``. So before
an in-place swap the replica checks: files present, only safetensors, every
safetensors header readable, the fingerprint (the registry's definition: sha256
of the canonical JSON manifest of file hashes) as expected, and the same
tensor names, shapes and dtypes as the loaded version (see :class:`Signature`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayloop.errors import IntegrityError, NotFoundError, UnsafeArtifactError

UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Config keys that fix the tensor shapes and the graph; a change needs a new engine.
_SHAPE_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
)
# Files that change what the engine does outside the weights.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_MAX_HEADER = 100 << 20


def _files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def manifest(model_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, size}}`` of every non-hidden file (the registry's manifest)."""
    root = Path(model_dir)
    return {
        p.relative_to(root).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
        for p in _files(root)
        if p.name != "manifest.json" or p.parent != root
    }


def fingerprint(model_dir: str | Path) -> str:
    """Content fingerprint of a model directory, equal to the registry's for the same files."""
    m = manifest(model_dir)
    canon = json.dumps({k: [v["sha256"], int(v["size"])] for k, v in sorted(m.items())}, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def read_safetensors_header(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 1 or n > _MAX_HEADER or 8 + n > size:
            raise IntegrityError(f"{path.name} is not a valid safetensors file (bad header length)", path=str(path))
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise IntegrityError(
                f"{path.name} is not a valid safetensors file (header is not JSON)", path=str(path)
            ) from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise IntegrityError(
            f"{path.name} is truncated: {size} bytes, its header needs {8 + n + end}",
            path=str(path),
            hint="Copy the checkpoint again; a partial checkpoint would give a mixed model.",
        )
    return dict(header)


@dataclass(frozen=True)
class Signature:
    """What must match for an in-place weight swap: graph config, tensor set, tokenizer."""

    config: str  # canonical JSON of the shape-relevant config keys
    tensors: str  # sha256 of sorted (name, shape)
    tokenizer: str  # sha256 of the tokenizer files
    num_tensors: int

    def differences(self, other: Signature) -> list[str]:
        out = []
        if self.config != other.config:
            out.append(f"architecture/shape config differs ({self.config} vs {other.config})")
        if self.tensors != other.tensors:
            out.append(f"tensor set differs ({self.num_tensors} vs {other.num_tensors} tensors, or names/shapes)")
        if self.tokenizer != other.tokenizer:
            out.append("tokenizer files differ")
        return out


# Keys `save_pretrained` writes about where a tokenizer was loaded from; they do not change tokenization.
_TOKENIZER_LOADER_KEYS = frozenset({"is_local", "local_files_only", "name_or_path", "_commit_hash"})


def _tokenizer_file_bytes(path: Path) -> bytes:
    """The bytes that decide tokenization: ``tokenizer_config.json`` without loader-only keys."""
    raw = path.read_bytes()
    if path.name != "tokenizer_config.json":
        return raw
    try:
        cfg = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(cfg, dict):
        return raw
    kept = {k: v for k, v in cfg.items() if k not in _TOKENIZER_LOADER_KEYS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()


def check_model_dir(model_dir: str | Path, *, expected_fingerprint: str | None = None) -> Signature:
    """Validate a model directory and return its :class:`Signature`.

    Raises :class:`NotFoundError` (missing dir/files), :class:`UnsafeArtifactError`
    (pickle weights) or :class:`IntegrityError` (bad header, truncation, shard
    missing, fingerprint mismatch).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise NotFoundError(
            f"model directory {str(root)!r} does not exist", hint="Check the path or `rayloop models show`."
        )
    files = _files(root)
    if bad := [p.name for p in files if p.suffix.lower() in UNSAFE_SUFFIXES]:
        raise UnsafeArtifactError(f"{str(root)!r} holds pickle-based weights {bad}; only safetensors are accepted")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise NotFoundError(f"{str(root)!r} has no config.json; it is not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise IntegrityError(f"{cfg_path} is not valid JSON: {e}", path=str(cfg_path)) from None
    weights = sorted(p for p in files if p.suffix == ".safetensors")
    if not weights:
        raise NotFoundError(f"{str(root)!r} holds no *.safetensors weights")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text()).get("weight_map", {}).values())
        if missing := sorted(wanted - {p.name for p in weights}):
            raise IntegrityError(f"{str(root)!r} lacks shards {missing} listed in its index", path=str(index))
    # Names and shapes, not dtypes: the engine casts to its own dtype on load.
    tensors: list[tuple[str, list[int]]] = []
    for p in weights:
        for name, meta in read_safetensors_header(p).items():
            tensors.append((name, list(meta["shape"])))
    if expected_fingerprint is not None:
        got = fingerprint(root)
        if got != expected_fingerprint:
            raise IntegrityError(
                f"{str(root)!r} has fingerprint {got[:16]}..., expected {expected_fingerprint[:16]}...",
                path=str(root),
                hint="The files were modified or belong to another version; fetch the version again.",
            )
    text_cfg = cfg.get("text_config", cfg)
    shape_cfg = {k: text_cfg.get(k, cfg.get(k)) for k in _SHAPE_KEYS}
    tok = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (root / name).is_file():
            tok.update(name.encode() + b"\0" + _tokenizer_file_bytes(root / name))
    return Signature(
        config=json.dumps(shape_cfg, sort_keys=True, separators=(",", ":")),
        tensors=hashlib.sha256(json.dumps(sorted(tensors)).encode()).hexdigest(),
        tokenizer=tok.hexdigest(),
        num_tensors=len(tensors),
    )
