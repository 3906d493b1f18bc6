"""The whole loop, as a user runs it: `rayloop demo`.

The poisoned-feedback case (`rayloop demo --poison`) differs only in the
corrections users send; its gate rejection is tested on the pipeline job
(tests/integration/test_train_jobs.py), without a second demo run.

Each run gets its own RAYLOOP_HOME and ports, starts its own Ray head through
`rayloop up`, and is stopped with `rayloop down`. The base model built once for
the test session is copied in (the demo reuses a matching build).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rayloop.config import load_settings
from rayloop.registry import Registry
from tests.integration.serving_util import free_port


def _run_demo(base_model_dir: Path, root: Path, *args: str, extra_config: str = "") -> tuple[dict[str, Any], Path]:
    home = root / "home"
    home.mkdir(parents=True)
    shutil.copytree(base_model_dir, home / "base-model")
    (root / "rayloop.yaml").write_text(
        f"ray:\n  port: {free_port()}\n  dashboard_port: {free_port()}\n  dashboard_agent_port: {free_port()}\n"
        f"serving:\n  http_port: {free_port()}\n" + extra_config
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAYLOOP_CONFIG", "RAYLOOP_STORAGE", "RAYLOOP_REGISTRY_URL")
    }
    env["RAYLOOP_HOME"] = str(home)
    cli = [sys.executable, "-m", "rayloop.cli"]
    try:
        r = subprocess.run(
            [*cli, "demo", "--json", "--repeats", "1", "--steps", "50,100", "--interval", "8", *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert r.returncode == 0, f"demo failed ({r.returncode}):\n{r.stderr[-4000:]}"
        summary = json.loads((home / "demo-summary.json").read_text())
        assert json.loads(r.stdout) == summary  # stdout holds the JSON document and nothing else
        # What Ray, Ray Data, DeepSpeed and vLLM wrote went to the demo's log, not to the terminal.
        (log,) = (home / "logs").glob("demo-*.log")
        assert "Ray cluster" in log.read_text() and "Ray cluster" not in r.stderr, r.stderr[-2000:]
        # The endpoint is left up for the user to try.
        import httpx

        ping = httpx.get(f"{summary['endpoint']}/healthz", timeout=30)
        assert ping.status_code == 200
    finally:
        subprocess.run([*cli, "down"], cwd=root, env=env, capture_output=True, text=True, timeout=180)
    return summary, root


@pytest.mark.slow
def test_demo_improves_production(base_model_dir: Path, tmp_path: Path) -> None:
    good, root = _run_demo(base_model_dir, tmp_path / "good")
    base, cand = good["baseline"], good["candidate"]
    assert base["version"] == 1 and cand["version"] == 2
    assert base["new_accuracy"] <= 0.2, base
    assert cand["new_accuracy"] >= 0.8, cand
    assert cand["known_accuracy"] >= base["known_accuracy"] - 0.1, (base, cand)
    assert good["gate"]["decision"] == "accepted"
    ro = good["rollout"]
    assert ro["strategy"] == "canary" and ro["status"] == "succeeded", ro
    assert ro["requests"] > 0 and ro["failed_requests"] == 0
    assert good["traffic_before"]["failed_requests"] == 0
    assert good["production_version"] == 2

    # Lineage: v2 came from v1 through the snapshot the pipeline built.
    settings = load_settings(root / "rayloop.yaml", env={"RAYLOOP_HOME": str(root / "home")})
    chain = Registry.from_settings(settings).lineage("demo@2")
    assert [v.version for v in chain] == [2, 1]
    assert chain[0].lineage.get("snapshot_id")
    assert chain[0].annotations["gate"]["decision"] == "accepted"
    assert chain[0].annotations["gate"]["against"] == 1
    # The full evaluation report is stored on the candidate: vLLM greedy accuracy and target loss per set.
    report = chain[0].annotations["evaluation"]
    cand_sets, prod_sets = report["candidate"]["sets"], report["production"]["sets"]
    assert {"new_facts", "known_facts", "golden", "eval_split"} <= set(cand_sets)
    assert cand_sets["new_facts"]["loss"] < prod_sets["new_facts"]["loss"]
    assert cand_sets["new_facts"]["accuracy"] == cand["new_accuracy"]
    # One evaluation engine: production's weights were swapped in after the candidate's, and matched the
    # golden answers its serving replica recorded on a fresh engine.
    assert [e["mode"] for e in report["candidate"]["engine"]] == ["fresh"], report["candidate"]["engine"]
    assert [e["mode"] for e in report["production"]["engine"]] == ["in_place"], report["production"]["engine"]
    # The report the demo wrote (and printed): the canary that promoted v2, with its judged steps; both
    # versions' live traffic; both versions' evaluation accuracy.
    page = Path(good["report"]).read_text()
    assert page.count("<svg") == 3 and "<script" not in page
    assert "canary" in page and "succeeded" in page and "judged, last pass" in page
    assert "<td>v1</td>" in page and "<td>v2</td>" in page and "accepted" in page
