"""What may be in a model directory (issue 16): no links, no special files, only complete safetensors.

The registry (``Registry.register``) and the serving replica
(``checkpoint.check_model_dir``) share one set of checks, so every refusal
is tested on both.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from rayloop.errors import IntegrityError, RegistryError, UnsafeArtifactError
from rayloop.registry import Registry
from rayloop.serving import checkpoint
from tests.registry_util import make_model_dir

CHECKERS = ["registry", "serving"]


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "storage"), f"sqlite:///{tmp_path / 'reg.db'}", cache_dir=tmp_path / "cache")


def _refused(kind: str, reg: Registry, model: Path, error: type[RegistryError], match: str) -> RegistryError:
    """Check ``model`` with the registry or the serving replica; it must raise ``error`` matching ``match``."""
    with pytest.raises(error, match=match) as ei:
        if kind == "registry":
            reg.register("demo", model)
        else:
            checkpoint.check_model_dir(model)
    if kind == "registry":
        assert reg.list_models() == []  # nothing registered, nothing copied
    return ei.value


# -- links and special files ------------------------------------------------------
@pytest.mark.parametrize("kind", CHECKERS)
def test_symlinked_tokenizer_is_refused(kind: str, reg: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    secret = tmp_path / "outside" / "secret.json"
    secret.parent.mkdir()
    secret.write_text('{"api_key": "do-not-serve"}')
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    err = _refused(kind, reg, model, UnsafeArtifactError, r"tokenizer\.json in .* is a symbolic link .*secret\.json")
    assert "Copy the real file" in err.hint


@pytest.mark.parametrize("kind", CHECKERS)
def test_symlinked_directory_is_refused(kind: str, reg: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("not part of the model")
    (model / "sub").symlink_to(outside, target_is_directory=True)
    _refused(kind, reg, model, UnsafeArtifactError, r"sub/ in .* is a symbolic link")


@pytest.mark.parametrize("kind", CHECKERS)
def test_named_pipe_is_refused(kind: str, reg: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    os.mkfifo(model / "weights.pipe")
    _refused(kind, reg, model, UnsafeArtifactError, r"weights\.pipe in .* is a named pipe")


# -- incomplete safetensors ---------------------------------------------------------
@pytest.mark.parametrize("kind", CHECKERS)
def test_safetensors_cut_in_half_is_refused(kind: str, reg: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    weights = model / "model.safetensors"
    full = weights.stat().st_size
    os.truncate(weights, full // 2)
    error = UnsafeArtifactError if kind == "registry" else IntegrityError
    err = _refused(
        kind,
        reg,
        model,
        error,
        rf"model\.safetensors is truncated: it holds {full // 2} bytes, its header promises {full}$",
    )
    if isinstance(err, IntegrityError):
        assert err.path is not None and err.path.endswith("model.safetensors")


@pytest.mark.parametrize("kind", CHECKERS)
def test_padded_safetensors_is_refused(kind: str, reg: Registry, tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    weights = model / "model.safetensors"
    full = weights.stat().st_size
    with open(weights, "ab") as f:
        f.write(bytes(16))
    error = UnsafeArtifactError if kind == "registry" else IntegrityError
    _refused(
        kind,
        reg,
        model,
        error,
        rf"model\.safetensors has 16 bytes after its last tensor: it holds {full + 16} bytes, its header promises {full}$",
    )


@pytest.mark.parametrize("kind", CHECKERS)
def test_safetensors_is_validated_by_the_safetensors_package(kind: str, reg: Registry, tmp_path: Path) -> None:
    """The sizes add up, but a 2x2 float32 tensor cannot fit in 8 bytes: the engine's loader would refuse it."""
    model = make_model_dir(tmp_path / "m")
    raw = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    error = UnsafeArtifactError if kind == "registry" else IntegrityError
    _refused(kind, reg, model, error, r"model\.safetensors is not a valid safetensors file \(.*invalid shape")


# -- what still works -------------------------------------------------------------
def test_valid_dir_registers_with_the_serving_fingerprint(reg: Registry, tmp_path: Path) -> None:
    from rayloop import modelfiles

    model = make_model_dir(tmp_path / "m", shards=2, extra={"sub/notes.txt": b"hello", ".git/HEAD": b"ref"})
    (model / ".cache").symlink_to(tmp_path, target_is_directory=True)  # hidden: skipped, never followed
    mv = reg.register("demo", model)
    # The definition stored in registry databases, spelled out: it must never change.
    canon = {
        rel: [hashlib.sha256((model / rel).read_bytes()).hexdigest(), (model / rel).stat().st_size]
        for rel in sorted(mv.manifest)
    }
    pinned = hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()
    assert sorted(mv.manifest) == sorted(
        ["config.json", "tokenizer.json", "tokenizer_config.json", "sub/notes.txt"]
        + [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    )
    assert mv.fingerprint == pinned == checkpoint.fingerprint(model)
    assert modelfiles.fingerprint(modelfiles.manifest(model)) == pinned
    fetched = reg.fetch("demo@1")
    assert checkpoint.fingerprint(fetched) == pinned  # the verified-marker file is hidden: not counted
    checkpoint.check_model_dir(fetched, expected_fingerprint=mv.fingerprint)


def test_header_comes_from_the_safetensors_package(tmp_path: Path) -> None:
    from rayloop import modelfiles

    p = tmp_path / "w.safetensors"
    save_file({"a": np.zeros((3, 2), np.float16), "b": np.zeros(4, np.int64)}, str(p), metadata={"format": "np"})
    h = modelfiles.read_safetensors_header(p)
    assert h.metadata == {"format": "np"}
    assert {k: (v["dtype"], v["shape"]) for k, v in h.tensors.items()} == {"a": ("F16", [3, 2]), "b": ("I64", [4])}
    assert h.file_bytes == p.stat().st_size == 8 + h.header_bytes + 3 * 2 * 2 + 4 * 8
    link = tmp_path / "link.safetensors"
    link.symlink_to(p)
    with pytest.raises(UnsafeArtifactError, match="symbolic link"):
        modelfiles.read_safetensors_header(link)


# -- the local cache an engine loads from -------------------------------------------
def test_cached_file_swapped_for_a_link_is_fetched_again(reg: Registry, tmp_path: Path) -> None:
    """Same size and mtime behind the link: only refusing links catches it without re-hashing."""
    model = make_model_dir(tmp_path / "m")
    reg.register("demo", model)
    path = reg.fetch("demo@1")
    cached = path / "tokenizer.json"
    st = cached.stat()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(cached.read_bytes())
    os.utime(elsewhere, ns=(st.st_atime_ns, st.st_mtime_ns))
    cached.unlink()
    cached.symlink_to(elsewhere)
    assert reg.fetch("demo@1") == path
    assert not cached.is_symlink() and cached.read_bytes() == (model / "tokenizer.json").read_bytes()
    checkpoint.check_model_dir(path)
