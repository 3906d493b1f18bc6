"""Train a candidate from a snapshot and register it: what `rayloop train` and `train_jobs.retrain` run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rayloop.config import Settings


def run_train(
    settings: Settings,
    *,
    snapshot_id: str,
    base: str | None = None,
    workers: int | None = None,
    zero_stage: int | None = None,
    gpu: bool = False,
    name: str | None = None,
    register: bool = True,
    out: str | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Retrain and (unless ``register=False``) register + move ``candidate``; returns a summary."""
    from rayloop.data.snapshot import resolve_snapshot_id
    from rayloop.registry import parse_ref
    from rayloop.registry.parent import resolve_parent
    from rayloop.training.register import register_candidate
    from rayloop.training.retrain import retrain

    snapshot_id = resolve_snapshot_id(settings, snapshot_id)
    if gpu:
        settings = settings.model_copy(update={"training": settings.training.model_copy(update={"use_gpu": True})})
    base_dir, _ = resolve_parent(settings, None, base)
    parent_version: int | None = None
    base_ref: str | None = None
    model_name = name or settings.serving.model
    if base and not Path(base).is_dir():
        from rayloop.registry import Registry

        mv = Registry.from_settings(settings).resolve(base)
        parent_version, model_name, base_ref = mv.version, name or parse_ref(base).name, mv.ref
    out_dir = Path(out) if out else settings.home_path / "runs" / f"{snapshot_id[:12]}-{time.strftime('%Y%m%d-%H%M%S')}"
    res = retrain(
        settings,
        snapshot_id=snapshot_id,
        base_dir=base_dir,
        output_dir=out_dir,
        workers=workers,
        zero_stage=zero_stage,
        base_ref=base_ref,
    )
    summary: dict[str, Any] = {
        "model_dir": str(res.model_dir),
        "train_loss": res.train_loss,
        "eval_loss": res.eval_loss,
        "base_eval_loss": res.metrics.get("base_eval_loss"),
        "steps": res.steps,
        "checkpoint_uri": res.checkpoint_uri,
        "snapshot_id": snapshot_id,
    }
    if register:
        mv = register_candidate(
            settings, res, name=model_name, parent_version=parent_version, snapshot_id=snapshot_id, job_id=job_id
        )
        summary.update({"registered": f"{mv.name}@{mv.version}", "fingerprint": mv.fingerprint})
    return summary
