"""Fine-tune a parent model on a snapshot with Ray Train + DeepSpeed.

    from rayloop.config import load_settings
    from rayloop.training.retrain import retrain
    res = retrain(load_settings(), snapshot_id="3f2a...", base_dir=Path(".rayloop/base-model"),
                  output_dir=Path("/tmp/candidate"), workers=2, zero_stage=3)
    print(res.train_loss, res.eval_loss, res.model_dir)

Blocks come from the snapshot through Ray Data (``datasets=`` of the trainer,
read per rank with ``get_dataset_shard``). Workers get fractional CPUs
(``training.worker_num_cpus``) so the job starts while Serve holds cores.
Checkpoints go to ``<storage>/checkpoints/<run name>/``; a failed worker
group is restarted up to ``training.max_failures`` times and resumes from the
latest one. The result is exported to ``output_dir`` as safetensors.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayloop.config import Settings
from rayloop.data.snapshot import parquet_files, read_manifest, snapshot_key, storage_of
from rayloop.envvars import environ_set
from rayloop.errors import DataError, TrainingError
from rayloop.training.deepspeed_config import build_ds_config
from rayloop.training.loop import CKPT_TAG, STATE_FILE

CACHE_SHARD_MAX_BYTES = 256 << 20
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's own knob (default 60 s)


@dataclass
class RetrainResult:
    """What :func:`retrain` produced."""

    model_dir: Path
    train_loss: float
    eval_loss: float | None
    steps: int
    checkpoint_uri: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def code_version() -> str:
    """Git commit of the code that trains (``-dirty`` when modified), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        if sha:
            return sha
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"rayloop=={version('rayloop')}"
    except PackageNotFoundError:
        return "unknown"


def resolve_config(
    settings: Settings,
    *,
    snapshot_id: str,
    manifest: dict[str, Any],
    base_dir: Path,
    workers: int | None = None,
    zero_stage: int | None = None,
) -> dict[str, Any]:
    """Everything a run needs, as JSON: written next to every checkpoint and into lineage."""
    ts = settings.training.model_copy(
        update={k: v for k, v in {"num_workers": workers, "zero_stage": zero_stage}.items() if v is not None}
    )
    counts = manifest["counts"]
    n_blocks = int(counts.get("train_blocks", 0))
    per_step = ts.micro_batch_size * ts.gradient_accumulation_steps
    # streaming_split(equal=True) gives each rank floor(n / workers) blocks.
    spe = (n_blocks // ts.num_workers) // per_step
    if spe == 0:
        raise DataError(
            f"snapshot {snapshot_id} has {n_blocks} train blocks: too few for {ts.num_workers} workers x "
            f"micro batch {ts.micro_batch_size} x accumulation {ts.gradient_accumulation_steps}",
            hint="Lower training.micro_batch_size or --workers, or preprocess more interactions.",
        )
    total = spe * ts.epochs
    block_size = int(manifest["settings"]["block_size"])
    ds_config = build_ds_config(ts, world_size=ts.num_workers, total_steps=total)
    return {
        "snapshot_id": snapshot_id,
        "base_dir": str(base_dir),
        "use_gpu": ts.use_gpu,
        "seed": ts.seed,
        "epochs": ts.epochs,
        "micro_batch_size": ts.micro_batch_size,
        "gradient_accumulation_steps": ts.gradient_accumulation_steps,
        "steps_per_epoch": spe,
        "total_steps": total,
        "checkpoint_every": ts.checkpoint_every,
        "has_eval": int(counts.get("eval_blocks", 0)) >= ts.num_workers,
        "cache_shard": n_blocks * block_size * 4 * 4 <= CACHE_SHARD_MAX_BYTES,
        "ds_config": ds_config,
        "resolved": {
            "training": ts.model_dump(mode="json"),
            "data": manifest.get("settings"),
            "snapshot_id": snapshot_id,
            "base_dir": str(base_dir),
            "steps_per_epoch": spe,
            "total_steps": total,
            "deepspeed": ds_config,
            "code_version": code_version(),
        },
    }


def _any(x: Any) -> Any:
    return x


def retrain(
    settings: Settings,
    *,
    snapshot_id: str,
    base_dir: Path,
    output_dir: Path,
    workers: int | None = None,
    zero_stage: int | None = None,
    base_ref: str | None = None,
) -> RetrainResult:
    """Train ``base_dir`` on snapshot ``snapshot_id``; export the result to ``output_dir``.

    ``base_ref`` (``NAME@VERSION``) is the registered version ``base_dir`` holds: a training worker on a node
    without ``base_dir`` fetches it from the registry into its node's cache."""
    import ray.data
    from ray.train.torch import TorchTrainer

    # The V2 classes (what ray.train exports at run time in Ray 2.60; its stubs name V1).
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from rayloop.raysession import data_context, ensure_ray
    from rayloop.training.export import export_hf
    from rayloop.training.loop import train_loop_per_worker

    base_dir = Path(base_dir).absolute()
    if not (base_dir / "config.json").is_file():
        raise TrainingError(
            f"base model directory {str(base_dir)!r} has no config.json",
            hint="Pass an HF model directory (`rayloop init` builds the demo one; `rayloop models fetch` gets a version).",
        )
    manifest = read_manifest(settings, snapshot_id)
    if manifest.get("trainable") is False:
        raise TrainingError(
            f"snapshot {snapshot_id} held data of a user who was forgotten (`rayloop data forget`); its training "
            "blocks were deleted and it is not trained on again",
            hint="Build a new snapshot from the store as it is now: `rayloop data preprocess`.",
        )
    cfg = resolve_config(
        settings, snapshot_id=snapshot_id, manifest=manifest, base_dir=base_dir, workers=workers, zero_stage=zero_stage
    )
    ts = settings.training
    n_workers = cfg["resolved"]["training"]["num_workers"]
    st = storage_of(settings)
    started = ensure_ray(settings)
    data_context()
    try:
        # Read tasks ask for a fraction of a CPU: with Serve replicas and the training
        # workers holding the rest of a small cluster, a default 1-CPU read task never
        # gets scheduled and the workers wait on their shards forever.
        datasets: dict[str, Any] = {
            "train": ray.data.read_parquet(
                parquet_files(st, snapshot_key(snapshot_id, "train", "blocks")),
                filesystem=st.fs,
                partitioning=None,
                num_cpus=settings.training.data_num_cpus,
            )
        }
        if cfg["has_eval"]:
            datasets["eval"] = ray.data.read_parquet(
                parquet_files(st, snapshot_key(snapshot_id, "eval", "blocks")),
                filesystem=st.fs,
                partitioning=None,
                num_cpus=settings.training.data_num_cpus,
            )
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if not ts.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        for var in ("OMP_NUM_THREADS", "RAYLOOP_HOME"):
            if os.environ.get(var):
                env[var] = os.environ[var]
        # Workers load the base model on their own nodes (see training.loop): where to find it there. Not in
        # cfg["resolved"], which is written beside checkpoints and into lineage.
        cfg["base_ref"] = base_ref
        cfg["settings"] = settings.dump()
        name = f"retrain-{snapshot_id[:12]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        resources = {"CPU": ts.worker_num_cpus}
        if ts.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(
                num_workers=n_workers,
                use_gpu=ts.use_gpu,
                resources_per_worker=resources,
                placement_strategy=ts.placement_strategy,
            ),
            datasets=datasets,
            run_config=_any(RunConfig)(
                name=name,
                storage_path=st.path("checkpoints"),
                storage_filesystem=st.fs,
                failure_config=FailureConfig(
                    max_failures=ts.max_failures, controller_failure_limit=ts.max_start_failures
                ),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": env},
            ),
        )
        t_fit = time.monotonic()
        try:
            # Ray Train reads the start timeout from the driver's environment (and passes it on to its controller).
            with environ_set({START_TIMEOUT_ENV: str(ts.start_timeout_s)}):
                result = trainer.fit()
        except Exception as e:  # Ray wraps worker errors; keep the cause in the message
            if "worker group startup timed out" in str(e) or "WorkerGroupStartupTimeout" in repr(e):
                raise TrainingError(
                    f"training run {name} failed: its {n_workers} workers ({resources} each) found no room on the "
                    f"cluster within training.start_timeout_s ({ts.start_timeout_s:.0f}s), "
                    f"{ts.max_start_failures + 1} times",
                    hint="See `ray status` for what is free; lower training.num_workers or worker_num_cpus, add a "
                    "node, or raise training.start_timeout_s where nodes take long to join.",
                ) from e
            raise TrainingError(
                f"training run {name} failed: {e}", hint="See the worker logs in the Ray dashboard."
            ) from e
        if result.checkpoint is None:
            raise TrainingError(f"training run {name} reported no checkpoint")
        metrics = dict(result.metrics or {})
        metrics["fit_seconds"] = round(time.monotonic() - t_fit, 2)
        ckpt = result.checkpoint
        with ckpt.as_directory() as d:
            import json

            state = json.loads((Path(d) / STATE_FILE).read_text())
            extra = {
                "snapshot_id": snapshot_id,
                "parent_dir": str(base_dir),
                "metrics": metrics,
                "config": cfg["resolved"],
                "checkpoint": ckpt.path,
            }
            t_export = time.monotonic()
            model_dir = export_hf(d, CKPT_TAG, base_dir, output_dir, extra)
            metrics["export_seconds"] = round(time.monotonic() - t_export, 2)
        return RetrainResult(
            model_dir=model_dir,
            train_loss=float(metrics.get("loss", math.nan)),
            eval_loss=metrics.get("eval_loss"),
            steps=int(metrics.get("step", state["step"])),
            checkpoint_uri=st.uri_of(ckpt.path[len(st.base) :].lstrip("/"))
            if ckpt.path.startswith(st.base)
            else ckpt.path,
            config=cfg["resolved"],
            metrics=metrics,
            history=state["history"],
        )
    finally:
        if started:
            ray.shutdown()
