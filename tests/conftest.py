"""Shared fixtures.

Integration tests share one local Ray cluster per session (``ray_cluster``)
and one pre-built demo base model (``base_model_dir``). Tests under
``tests/unit`` are marked ``unit`` and those under ``tests/integration``
``integration`` automatically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayloop.config import Settings, load_settings

# Keep vLLM and Ray small and quiet on a 2-core machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `rayloop init` keeps its builds in $XDG_CACHE_HOME: one cache per test session (the first build is real, the
# demo and the README's `rayloop init` reuse it as they would on a user's machine), never the user's own.
# vLLM's own cache stays where it was.
os.environ.setdefault(
    "VLLM_CACHE_ROOT", os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm")
)
_CACHE = tempfile.mkdtemp(prefix="rayloop-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)


def _quarantined() -> list[str]:
    path = Path(__file__).with_name("quarantine.txt")
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()] if path.is_file() else []
    return [ln for ln in lines if ln]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = _has_gpu()
    quarantined = _quarantined()
    for item in items:
        if any(item.nodeid == q or item.nodeid.startswith(q + "::") for q in quarantined):
            item.add_marker(pytest.mark.quarantine)
        path = str(item.fspath)
        if f"{os.sep}unit{os.sep}" in path:
            item.add_marker(pytest.mark.unit)
        elif f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none is visible on this machine"))


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


@pytest.fixture
def rayloop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh RAYLOOP_HOME with nothing in it."""
    home = tmp_path / "home"
    monkeypatch.setenv("RAYLOOP_HOME", str(home))
    for var in ("RAYLOOP_STORAGE", "RAYLOOP_REGISTRY_URL", "RAYLOOP_CONFIG", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def settings(rayloop_home: Path) -> Settings:
    return load_settings(env={"RAYLOOP_HOME": str(rayloop_home)})


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base model, built once per test session (about a minute on 2 cores).

    Set RAYLOOP_TEST_BASE_MODEL to a directory built by `rayloop init` to reuse one.
    """
    reuse = os.environ.get("RAYLOOP_TEST_BASE_MODEL")
    if reuse and (Path(reuse) / "rayloop_build.json").is_file():
        return Path(reuse)
    from rayloop.demo.setup import init_base_model

    out = tmp_path_factory.mktemp("base-model")
    init_base_model(Settings(), out=str(out), show_progress=False)  # what `rayloop init --out` does
    return out


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One local Ray cluster for the whole test session, shut down at the end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # address="local": always a fresh cluster, never one a `ray start` left on this machine.
    ctx = ray.init(
        address="local",
        num_cpus=int(os.environ.get("RAYLOOP_TEST_NUM_CPUS", "4")),
        object_store_memory=512 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}},
    )
    try:
        yield {"address": ctx.address_info["address"], "gcs_address": ctx.address_info.get("gcs_address")}
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        shutil.rmtree(tmp_path_factory.getbasetemp() / "ray", ignore_errors=True)
