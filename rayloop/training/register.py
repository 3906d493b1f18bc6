"""Register a retrained model as a new version with lineage, and point ``candidate`` at it.

from rayloop.registry import Registry
mv = register_candidate(settings, result, name="demo", parent_version=1, snapshot_id=sid)
Registry.from_settings(settings).resolve("demo@candidate").version == mv.version
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayloop.config import Settings

if TYPE_CHECKING:
    from rayloop.registry import ModelVersion
    from rayloop.training.retrain import RetrainResult

CANDIDATE_ALIAS = "candidate"


def register_candidate(
    settings: Settings,
    result: RetrainResult,
    *,
    name: str,
    parent_version: int | None,
    snapshot_id: str,
    job_id: str | None = None,
) -> ModelVersion:
    """Register ``result.model_dir`` under ``name`` and move alias ``candidate`` to it."""
    from rayloop.registry import Registry

    reg = Registry.from_settings(settings)
    metrics: dict[str, Any] = {
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "steps": result.steps,
        "base_eval_loss": result.metrics.get("base_eval_loss"),
        "train_seconds": result.metrics.get("train_seconds"),
        "checkpoint_uri": result.checkpoint_uri,
    }
    lineage: dict[str, Any] = {
        "snapshot_id": snapshot_id,
        "training_config": result.config,
        "code_version": result.config.get("code_version"),
        "metrics": metrics,
    }
    if job_id:
        lineage["job_id"] = job_id
    mv = _already_registered(reg, name, result.model_dir, snapshot_id, parent_version)
    if mv is None:
        mv = reg.register(
            name,
            result.model_dir,
            parent=parent_version,
            metadata={"source": "retrain", "parent_version": parent_version},
            lineage=lineage,
            actor="retrain",
        )
    reg.set_alias(
        name,
        CANDIDATE_ALIAS,
        mv.version,
        actor="retrain",
        reason=f"retrained on snapshot {snapshot_id} from version {parent_version}",
    )
    return reg.resolve(f"{name}@{mv.version}")


def _already_registered(
    reg: Any, name: str, model_dir: Path, snapshot_id: str, parent_version: int | None
) -> ModelVersion | None:
    """The version these very files were registered as by an earlier attempt of the same run, if any.

    A pipeline resumed after a crash between registering and recording that it did must not register the
    same candidate twice: same files (fingerprint), same snapshot and parent means the same candidate.
    """
    from rayloop.errors import NotFoundError
    from rayloop.modelfiles import dir_fingerprint

    try:
        versions = reg.list_versions(name)
    except NotFoundError:
        return None  # the model's first version
    fp = dir_fingerprint(model_dir)
    for mv in reversed(versions):
        if mv.fingerprint == fp and mv.parent == parent_version and mv.lineage.get("snapshot_id") == snapshot_id:
            found: ModelVersion = mv
            return found
    return None
