"""Rollout commands on the command line, without a cluster (errors, help, status)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rayloop.cli import cli
from rayloop.config import load_settings
from rayloop.registry import Registry
from tests.registry_util import make_model_dir


def test_deploy_help_lists_strategies_without_importing_ray() -> None:
    code = (
        "import sys; from rayloop.cli import cli; import click.testing as t; "
        "r = t.CliRunner().invoke(cli, ['deploy', '--help']); assert r.exit_code == 0, r.output; "
        "assert 'rolling|blue-green|canary|shadow' in r.output, r.output; "
        "print(','.join(m for m in ('ray', 'torch', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_deploy_refuses_a_gate_rejected_version_before_touching_a_cluster(rayloop_home: Path, tmp_path: Path) -> None:
    reg = Registry.from_settings(load_settings(env={"RAYLOOP_HOME": str(rayloop_home)}))
    reg.register("demo", make_model_dir(tmp_path / "m", seed=3))
    reg.annotate("demo@1", "gate", {"decision": "rejected", "reasons": ["new_facts 0.10 < 0.20"]})
    r = CliRunner().invoke(cli, ["deploy", "demo@1", "--strategy", "canary"])
    assert r.exit_code == 1
    assert "RolloutError: demo@1 was rejected by the validation gate (new_facts 0.10 < 0.20)" in r.output
    assert "hint: Deploy a version the gate accepted, or pass --force" in r.output


def test_bad_flags_are_named(rayloop_home: Path) -> None:
    r = CliRunner().invoke(cli, ["deploy", "demo@1", "--strategy", "linear"])
    assert r.exit_code == 2 and "'linear' is not one of" in r.output
    r = CliRunner().invoke(cli, ["deploy", "demo@1", "--steps", "50,10,100"])
    assert r.exit_code == 1 and "strictly increasing" in r.output
    r = CliRunner().invoke(cli, ["deploy", "nosuch@1"])
    assert r.exit_code == 1 and "NotFoundError" in r.output


def test_status_json_without_a_cluster(rayloop_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole suite shares one process: an integration test may have left Ray initialized in it.
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    reg = Registry.from_settings(load_settings(env={"RAYLOOP_HOME": str(rayloop_home)}))
    reg.register("demo", make_model_dir(tmp_path / "m", seed=3))
    reg.set_alias("demo", "production", 1)
    r = CliRunner().invoke(cli, ["status", "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["serve"] is None and "ClusterError" in st["serve_error"]
    assert st["models"]["demo"]["aliases"] == {"production": 1}
    assert st["models"]["demo"]["active_rollout"] is None


def test_abort_without_rollout_is_a_clear_error(rayloop_home: Path, tmp_path: Path) -> None:
    reg = Registry.from_settings(load_settings(env={"RAYLOOP_HOME": str(rayloop_home)}))
    reg.register("demo", make_model_dir(tmp_path / "m", seed=3))
    r = CliRunner().invoke(cli, ["abort", "demo"])
    assert r.exit_code == 1
    assert "no rollout of 'demo' is running" in r.output or "ClusterError" in r.output


def test_status_shows_capture_health_in_one_line() -> None:
    from rayloop.rollout.cli import _capture_line

    cap = {
        "written": {"interactions": 60, "feedback": 5},
        "quarantined": {"interactions": 1},
        "spilled": {"interactions": 10},
        "replayed": {"interactions": 4},
        "dropped": {},
        "storage_down": True,
        "journal": {"dir": "/tmp/j", "rows": 6},
    }
    assert _capture_line(cap) == (
        "capture: written 65, quarantined 1, spilled 10, replayed 4, dropped 0; 6 rows waiting in the journal "
        "(/tmp/j); STORAGE DOWN"
    )
    assert _capture_line({"error": "GetTimeoutError: slow"}) == "capture: unknown (GetTimeoutError: slow)"
