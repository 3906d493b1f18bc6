"""Ray job entrypoint: the whole pipeline from collected data to a deployed version.

    ray job submit --working-dir . -- python -m train_jobs.pipeline [--config rayloop.yaml] [--set KEY=VALUE]

Validates the settings, attaches to the cluster the job runs in, and hands off
to :func:`rayloop.pipeline.run_pipeline`. Stage progress goes to the job log
(visible in the Ray dashboard); the run record is printed as JSON at the end
(indented, or one ``RAYLOOP_RESULT {json}`` line with ``--json``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from train_jobs._args import common_parser, job_main, settings_from


def main(argv: list[str] | None = None) -> int:
    ap = common_parser(__doc__.splitlines()[0], prog="python -m train_jobs.pipeline")
    ap.add_argument("--model", help="Override pipeline.model.")
    ap.add_argument("--no-deploy", action="store_true", help="Stop after the gate (pipeline.deploy=false).")
    ns = ap.parse_args(argv)

    def run() -> tuple[dict[str, Any], int]:
        import ray

        from rayloop.pipeline import run_pipeline

        extra: dict[str, Any] = {}
        if ns.model:
            extra["model"] = ns.model
        if ns.no_deploy:
            extra["deploy"] = False
        settings = settings_from(ns, {"pipeline": extra} if extra else None)
        ray.init(address=settings.ray.address or "auto", log_to_driver=True)

        def show(stage: str, status: str, info: dict[str, object]) -> None:
            print(f"[pipeline] {stage}: {status} {json.dumps(info, default=str)[:300]}", flush=True)

        return run_pipeline(settings, on_stage=show), 0

    return job_main(run, as_json=ns.json)


if __name__ == "__main__":
    sys.exit(main())
