"""``ray job submit --working-dir . -- python -m train_jobs.retrain --snapshot ID [--base NAME@REF] ...``.

``--snapshot`` defaults to ``$RAYLOOP_SNAPSHOT`` (how ``cluster/rayjob.yaml`` passes it).

Validates arguments into :class:`RetrainArgs` and settings, then trains with
Ray Train + DeepSpeed, exports safetensors and registers the candidate. The
last stdout line is ``RAYLOOP_RESULT {json}``.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rayloop.config import Settings
from train_jobs._args import common_parser, described, run, settings_from

# A job on Kubernetes gets its snapshot from the environment (a ConfigMap), so its manifest stays the same per run.
SNAPSHOT_ENV = "RAYLOOP_SNAPSHOT"


class RetrainArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    snapshot: str = Field(description="Snapshot id to train on (from `rayloop data preprocess`).")
    base: str | None = Field(default=None, description="Parent model: NAME@REF in the registry, or a directory.")
    workers: int | None = Field(default=None, ge=1, description="Ray Train workers (default: training.num_workers).")
    zero_stage: int | None = Field(default=None, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    gpu: bool = Field(default=False, description="Train on GPUs.")
    name: str | None = Field(default=None, description="Registry name of the candidate.")
    register_result: bool = Field(default=True, description="Register the result and move alias candidate.")
    out: str | None = Field(default=None, description="Directory for the exported model.")


def parse(argv: list[str]) -> tuple[RetrainArgs, Settings]:
    """The job's command line as validated arguments and settings (nothing runs)."""
    ap = common_parser("Fine-tune the parent on a snapshot with Ray Train + DeepSpeed.")
    ap.add_argument(
        "--snapshot",
        default=os.environ.get(SNAPSHOT_ENV) or None,
        help=f"{described(RetrainArgs, 'snapshot')} Default: ${SNAPSHOT_ENV}.",
    )
    ap.add_argument("--base", help=described(RetrainArgs, "base"))
    ap.add_argument("--workers", type=int, help=described(RetrainArgs, "workers"))
    ap.add_argument("--zero-stage", type=int, help=described(RetrainArgs, "zero_stage"))
    ap.add_argument("--gpu", action="store_true", help=described(RetrainArgs, "gpu"))
    ap.add_argument("--name", help=described(RetrainArgs, "name"))
    ap.add_argument("--no-register", action="store_true", help="Only export the model; do not register it.")
    ap.add_argument("--out", help=described(RetrainArgs, "out"))
    ns = ap.parse_args(argv)
    from pydantic import ValidationError

    from rayloop.errors import ConfigError

    if not ns.snapshot:
        raise ConfigError(
            "no snapshot to train on",
            hint=f"Pass --snapshot ID or set {SNAPSHOT_ENV} (`rayloop data preprocess` prints the id of the snapshot it makes).",
        )
    try:
        args = RetrainArgs(
            snapshot=ns.snapshot,
            base=ns.base,
            workers=ns.workers,
            zero_stage=ns.zero_stage,
            gpu=ns.gpu,
            name=ns.name,
            register_result=not ns.no_register,
            out=ns.out,
        )
    except ValidationError as e:
        bad = "; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid arguments: {bad}", hint="See `python -m train_jobs.retrain --help`.") from None
    return args, settings_from(ns)


def main(argv: list[str]) -> dict[str, Any]:
    args, settings = parse(argv)
    from rayloop.training.candidate import run_train

    return run_train(
        settings,
        snapshot_id=args.snapshot,
        base=args.base,
        workers=args.workers,
        zero_stage=args.zero_stage,
        gpu=args.gpu,
        name=args.name,
        register=args.register_result,
        out=args.out,
        job_id=os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID"),
    )


if __name__ == "__main__":
    run(main)
