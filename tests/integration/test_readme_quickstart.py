"""The README's CLI quickstart, run exactly as written (extracted from README.md) on a fresh cluster.

Only a rayloop.yaml with free ports is put in the directory first (the user's own config, so this
run cannot collide with the test session's cluster); the block itself is not changed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.integration.serving_util import free_port

README = Path(__file__).resolve().parents[2] / "README.md"


def quickstart_block() -> str:
    text = README.read_text()
    section = text[text.index("## CLI quickstart") :]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match is not None, "README.md has no bash block under '## CLI quickstart'"
    return match.group(1)


def test_the_quickstart_block_runs_as_written(tmp_path: Path) -> None:
    block = quickstart_block()
    assert block.strip().splitlines()[0].startswith("rayloop up") and "rayloop down" in block
    http, gcs, dash, agent = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "rayloop.yaml").write_text(
        f"ray:\n  port: {gcs}\n  dashboard_port: {dash}\n  dashboard_agent_port: {agent}\n  num_cpus: 4\n"
        f"  metrics_export_port: {free_port()}\n"
        f"serving:\n  http_port: {http}\n  engine:\n    kv_cache_gib: 1\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAYLOOP_", "RAY_DASHBOARD"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    script = "set -euo pipefail\n" + block
    try:
        run = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500
        )
    finally:
        subprocess.run(["bash", "-c", "rayloop down"], cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    # What the block did is in the registry: a candidate judged by the gate and, when accepted, rolled out.
    from rayloop.config import load_settings
    from rayloop.registry import Registry

    reg = Registry.from_settings(load_settings(env={"RAYLOOP_HOME": str(tmp_path / ".rayloop")}))
    candidate = reg.resolve("demo@2")
    assert "gate" in candidate.annotations, run.stdout[-5000:] + run.stderr[-5000:]
    decision = candidate.annotations["gate"]["decision"]
    assert candidate.lineage["snapshot_id"] and decision in ("accepted", "rejected")
    production = reg.get_alias("demo", "production")
    assert production == (2 if decision == "accepted" else 1), (decision, production)
    assert "rollout" in run.stdout or decision == "rejected"
    if decision == "accepted":  # `rayloop deploy` said what Serve was doing while green's replicas started
        assert re.search(r"rollout \d+: serve \S+", run.stdout), run.stdout[-3000:]
    print(json.dumps({"gate": decision, "production": production}))
