"""Check a model directory before an engine touches it.

A bad ``weights_path`` kills a running vLLM engine, and a checkpoint missing
some tensors silently yields a mixed model after ``reload_weights``. So before
an in-place swap the replica checks: files present, no symbolic links or
special files, only safetensors, every safetensors file complete (its size is
what its header promises), the fingerprint (the registry's definition: sha256
of the canonical JSON manifest of file hashes) as expected, and the same
tensor names, shapes and dtypes as the loaded version (see :class:`Signature`).

Listing, safetensors checks and the fingerprint come from :mod:`rayloop.modelfiles`,
which the registry uses too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayloop import modelfiles
from rayloop.errors import IntegrityError, NotFoundError, UnsafeArtifactError

UNSAFE_SUFFIXES = modelfiles.UNSAFE_SUFFIXES
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


def _files(root: Path) -> list[Path]:
    """Every non-hidden file under ``root``; a symbolic link or special file raises :class:`UnsafeArtifactError`."""
    return [p for _, p in modelfiles.list_files(root)]


def manifest(model_dir: str | Path) -> dict[str, modelfiles.FileDigest]:
    """``{relative path: {sha256, size}}`` of every non-hidden file (the registry's manifest)."""
    return modelfiles.manifest(model_dir)


def fingerprint(model_dir: str | Path) -> str:
    """Content fingerprint of a model directory, equal to the registry's for the same files."""
    return modelfiles.dir_fingerprint(model_dir)


def read_safetensors_header(path: Path, name: str | None = None) -> dict[str, Any]:
    """Tensor entries (``__metadata__`` removed) of a complete safetensors file, else :class:`IntegrityError`."""
    return modelfiles.read_safetensors_header(path, name=name).tensors


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
    (symbolic link, special file, pickle weights) or :class:`IntegrityError`
    (bad header, truncated or padded safetensors, shard missing, fingerprint
    mismatch).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise NotFoundError(
            f"model directory {str(root)!r} does not exist", hint="Check the path or `rayloop models show`."
        )
    listed = modelfiles.list_files(root)
    files = [p for _, p in listed]
    if bad := [p.name for p in files if p.suffix.lower() in UNSAFE_SUFFIXES]:
        raise UnsafeArtifactError(f"{str(root)!r} holds pickle-based weights {bad}; only safetensors are accepted")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise NotFoundError(f"{str(root)!r} has no config.json; it is not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise IntegrityError(f"{cfg_path} is not valid JSON: {e}", path=str(cfg_path)) from None
    weights = sorted((p, rel) for rel, p in listed if p.suffix == ".safetensors")
    if not weights:
        raise NotFoundError(f"{str(root)!r} holds no *.safetensors weights")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text()).get("weight_map", {}).values())
        if missing := sorted(wanted - {p.name for p, _ in weights}):
            raise IntegrityError(f"{str(root)!r} lacks shards {missing} listed in its index", path=str(index))
    # Names and shapes, not dtypes: the engine casts to its own dtype on load.
    tensors: list[tuple[str, list[int]]] = []
    for p, rel in weights:
        for name, meta in read_safetensors_header(p, rel).items():
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
