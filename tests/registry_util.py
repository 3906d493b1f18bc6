"""Helpers for registry tests: tiny fake Hugging Face model directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


# -- workers for multi-process tests (top level so spawn can import them) --------
def register_worker(
    storage: str, db: str, cache: str, endpoint: str | None, workdir: str, seed: int, barrier: Any, queue: Any
) -> None:
    """Register one distinct model as ``demo`` once every worker is ready."""
    from rayloop.registry import Registry

    try:
        model = make_model_dir(Path(workdir) / f"m{seed}", seed=seed)
        reg = Registry(storage, db, cache_dir=cache, s3_endpoint=endpoint)
        barrier.wait(180)
        mv = reg.register("demo", model, metadata={"seed": seed}, actor=f"w{seed}")
        queue.put(("ok", seed, mv.version, mv.fingerprint))
    except BaseException as e:
        queue.put(("error", seed, repr(e), None))


def race_worker(
    storage: str, db: str, cache: str, endpoint: str | None, version: int, barrier: Any, queue: Any
) -> None:
    """Race two things against the other workers: an alias CAS from 1, then taking the rollout lock."""
    from rayloop.errors import AliasConflictError, RolloutInProgressError
    from rayloop.registry import Registry

    try:
        reg = Registry(storage, db, cache_dir=cache, s3_endpoint=endpoint)
        barrier.wait(180)
        try:
            reg.set_alias("demo", "production", version, expect=1, actor=f"w{version}", reason="race")
            queue.put(("alias", version, "won"))
        except AliasConflictError:
            queue.put(("alias", version, "lost"))
        barrier.wait(180)
        try:
            reg.begin_rollout(
                "demo", from_version=1, to_version=version, strategy="canary", plan={}, owner=f"w{version}"
            )
            queue.put(("rollout", version, "won"))
        except RolloutInProgressError:
            queue.put(("rollout", version, "lost"))
    except BaseException as e:
        queue.put(("error", version, repr(e)))


def lock_worker(db_url: str, rounds: int, barrier: Any, queue: Any) -> None:
    """Take the lease lock ``x`` ``rounds`` times; report (start, end, token) of each hold."""
    import time

    from rayloop.registry.locks import lease_lock
    from rayloop.registry.sql import Database

    try:
        db = Database(db_url)
        barrier.wait(180)
        for _ in range(rounds):
            with lease_lock(db, "x", ttl_s=10, wait_s=120) as held:
                t0 = time.time()
                time.sleep(0.02)
                held.check()
                queue.put(("held", t0, time.time(), held.token))
    except BaseException as e:
        queue.put(("error", 0.0, 0.0, repr(e)))


def finished_rollout(**fields: Any) -> Any:
    """A finished :class:`~rayloop.registry.RolloutRecord` for code that only reads one (``fields`` override)."""
    from rayloop.registry import RolloutRecord, RolloutState

    base: dict[str, Any] = {
        "id": 1,
        "name": "demo",
        "from_version": 1,
        "to_version": 2,
        "strategy": "canary",
        "plan": {},
        "state": RolloutState(phase="done"),
        "history": [],
        "status": "succeeded",
        "owner": "test",
        "started_at": None,
        "updated_at": None,
        "ended_at": None,
        "active": False,
    }
    return RolloutRecord(**{**base, **fields})
