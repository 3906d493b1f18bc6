"""``rayloop train``: fine-tune the parent on a snapshot and register the candidate."""

from __future__ import annotations

import click


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
    from rayloop.training.candidate import run_train

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
