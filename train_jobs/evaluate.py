"""Ray job entrypoint: evaluate a candidate against production and apply the gate.

    ray job submit --working-dir . -- python -m train_jobs.evaluate demo@candidate --against demo@production

Exit code 0 when the gate accepts, 2 when it rejects, 1 on errors; the report
is printed as JSON (indented, or one ``RAYLOOP_RESULT {json}`` line with
``--json``) and stored on the candidate in the registry.
"""

from __future__ import annotations

import sys
from typing import Any

from train_jobs._args import common_parser, job_main, settings_from


def main(argv: list[str] | None = None) -> int:
    ap = common_parser(__doc__.splitlines()[0], prog="python -m train_jobs.evaluate")
    ap.add_argument("ref", help="Candidate, e.g. demo@candidate or demo@3.")
    ap.add_argument("--against", help="Model to compare with (default: NAME@production).")
    ns = ap.parse_args(argv)

    def run() -> tuple[dict[str, Any], int]:
        import ray

        from rayloop.evaluation.gate import run_gate

        settings = settings_from(ns)
        ray.init(address=settings.ray.address or "auto", log_to_driver=True)
        report = run_gate(settings, ns.ref, against=ns.against)
        return report.to_json(), 0 if report.accepted else 2

    return job_main(run, as_json=ns.json)


if __name__ == "__main__":
    sys.exit(main())
