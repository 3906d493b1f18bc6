"""Process environment for vLLM's CPU backend, set before an engine is built.

vLLM's CPU platform runs every engine through its multiprocessing executor,
so a plain ``AsyncLLM`` is three Python processes (the caller, the engine
core, one worker), each importing torch and vLLM: on a 2-core machine that is
about 13 s per process of a 44 s start. With one shard there is nothing to
distribute, so rayloop turns vLLM's multiprocessing flag off: the worker runs
inside the engine-core process (``AsyncLLM``, 30 s to start) and ``vllm.LLM``
runs entirely in the caller (14 s). Such an engine is not pinned to a core by
vLLM's OpenMP binding; its torch thread count comes from ``cpu_threads``.

Tensor-parallel engines keep the multiprocessing executor (one worker process
per shard) and the OpenMP binding given by ``cpu_threads_bind``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rayloop.config import EngineSettings
from rayloop.envvars import environ_set


def cpu_engine_env(settings: EngineSettings) -> dict[str, str]:
    """The environment variables a CPU engine with ``settings`` needs (nothing on GPU)."""
    if settings.accelerator != "cpu":
        return {}
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(settings.kv_cache_gib)))}
    if settings.tensor_parallel_size == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env["OMP_NUM_THREADS"] = str(settings.cpu_threads)
    else:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        if settings.cpu_threads_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads_bind
    return env


@contextmanager
def cpu_engine_env_applied(settings: EngineSettings) -> Iterator[None]:
    """Set :func:`cpu_engine_env` in this process's environment while an engine is built, then restore it.

    vLLM reads these variables while it builds the engine and its processes inherit them, so nothing
    needs them afterwards, and the caller's later children (Ray workers, training) must not get them.
    An explicit ``VLLM_CPU_KVCACHE_SPACE`` already set wins (tests keep it small).
    """
    wanted = cpu_engine_env(settings)
    if "VLLM_CPU_KVCACHE_SPACE" in os.environ:
        wanted.pop("VLLM_CPU_KVCACHE_SPACE", None)
    with environ_set(wanted):
        yield
