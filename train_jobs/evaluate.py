"""Ray job entrypoint: evaluate a candidate against production and apply the gate.

    ray job submit --working-dir . -- python -m train_jobs.evaluate demo@candidate --against demo@production

Exit code 0 when the gate accepts, 2 when it rejects, 1 on errors; the report
is printed as JSON and stored on the candidate in the registry.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_jobs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="candidate, e.g. demo@candidate or demo@3")
    parser.add_argument("--against", help="model to compare with (default: NAME@production)")
    parser.add_argument("--config", help="rayloop settings YAML")
    args = parser.parse_args(argv)

    import ray

    from rayloop.config import load_settings
    from rayloop.errors import RayloopError
    from rayloop.evaluation.gate import run_gate

    try:
        settings = load_settings(args.config)
        ray.init(address=settings.ray.address or "auto", log_to_driver=True)
        report = run_gate(settings, args.ref, against=args.against)
    except RayloopError as e:
        print(f"{type(e).__name__}: {e.message}\nhint: {e.hint}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1, default=str))
    return 0 if report["gate"]["decision"] == "accepted" else 2


if __name__ == "__main__":
    sys.exit(main())
