"""``rayloop train``: fine-tune the parent on a snapshot and register the candidate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

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
    from rayloop.data.cli import resolve_parent
    from rayloop.data.snapshot import resolve_snapshot_id
    from rayloop.registry import parse_ref
    from rayloop.training.register import register_candidate
    from rayloop.training.retrain import retrain

    snapshot_id = resolve_snapshot_id(settings, snapshot_id)
    if gpu:
        settings = settings.model_copy(update={"training": settings.training.model_copy(update={"use_gpu": True})})
    base_dir, _ = resolve_parent(settings, None, base)
    parent_version: int | None = None
    model_name = name or settings.serving.model
    if base and not Path(base).is_dir():
        from rayloop.registry import Registry

        mv = Registry.from_settings(settings).resolve(base)
        parent_version, model_name = mv.version, name or parse_ref(base).name
    out_dir = Path(out) if out else settings.home_path / "runs" / f"{snapshot_id[:12]}-{time.strftime('%Y%m%d-%H%M%S')}"
    res = retrain(
        settings, snapshot_id=snapshot_id, base_dir=base_dir, output_dir=out_dir, workers=workers, zero_stage=zero_stage
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


@click.command("train")
@click.option("--snapshot", "snapshot_id", required=True, help="Snapshot id from `rayloop data preprocess`.")
@click.option("--base", help="Parent: NAME@REF in the registry or a model directory (default: the demo base model).")
@click.option("--workers", type=click.IntRange(1), help="Ray Train workers (default: training.num_workers).")
@click.option("--zero-stage", type=click.IntRange(0, 3), help="DeepSpeed ZeRO stage (default: training.zero_stage).")
@click.option("--gpu", is_flag=True, help="Train on GPUs (NCCL, bf16).")
@click.option("--name", help="Registry name of the candidate (default: the parent's name or serving.model).")
@click.option("--no-register", is_flag=True, help="Only export the model; do not register it.")
@click.option(
    "--out", type=click.Path(file_okay=False), help="Where to export the model (default under RAYLOOP_HOME/runs)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def train_cmd(
    ctx: click.Context,
    snapshot_id: str,
    base: str | None,
    workers: int | None,
    zero_stage: int | None,
    gpu: bool,
    name: str | None,
    no_register: bool,
    out: str | None,
    as_json: bool,
) -> None:
    """Fine-tune the parent on a snapshot, export safetensors, register the candidate."""
    from rayloop.clisupport import print_json, settings

    summary = run_train(
        settings(ctx),
        snapshot_id=snapshot_id,
        base=base,
        workers=workers,
        zero_stage=zero_stage,
        gpu=gpu,
        name=name,
        register=not no_register,
        out=out,
    )
    if as_json:
        print_json(summary)
        return
    click.echo(
        f"trained {summary['steps']} steps: train loss {summary['train_loss']:.4f}, eval loss "
        f"{summary['eval_loss'] if summary['eval_loss'] is None else round(summary['eval_loss'], 4)} "
        f"(parent {summary['base_eval_loss']}); model in {summary['model_dir']}"
    )
    if "registered" in summary:
        click.echo(f"registered {summary['registered']} and moved alias candidate to it")
