"""Ray job entrypoint: the whole pipeline from collected data to a deployed version.

    ray job submit --working-dir . -- python -m train_jobs.pipeline --config rayloop.yaml

Validates the settings, attaches to the cluster the job runs in, and hands off
to :func:`rayloop.pipeline.run_pipeline`. Stage progress goes to the job log
(visible in the Ray dashboard); the run record is printed as JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_jobs.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="rayloop settings YAML (default: ./rayloop.yaml, env vars)")
    parser.add_argument("--model", help="override pipeline.model")
    parser.add_argument("--no-deploy", action="store_true", help="stop after the gate")
    args = parser.parse_args(argv)

    import ray

    from rayloop.config import load_settings
    from rayloop.errors import RayloopError
    from rayloop.pipeline import run_pipeline

    overrides: dict[str, object] = {}
    if args.model:
        overrides.setdefault("pipeline", {})["model"] = args.model  # type: ignore[index]
    if args.no_deploy:
        overrides.setdefault("pipeline", {})["deploy"] = False  # type: ignore[index]
    try:
        settings = load_settings(args.config, overrides=overrides)
        ray.init(address=settings.ray.address or "auto", log_to_driver=True)

        def show(stage: str, status: str, info: dict[str, object]) -> None:
            print(f"[pipeline] {stage}: {status} {json.dumps(info, default=str)[:300]}", flush=True)

        record = run_pipeline(settings, on_stage=show)
    except RayloopError as e:
        print(f"{type(e).__name__}: {e.message}\nhint: {e.hint}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
