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
        "capture: written 65, quarantined 1, spilled 10, replayed 4, recovered 0, dropped 0; 6 rows waiting in the journal "
        "(/tmp/j); STORAGE DOWN"
    )
    assert _capture_line({"error": "GetTimeoutError: slow"}) == "capture: unknown (GetTimeoutError: slow)"


def _two_rollouts(home: Path, tmp_path: Path) -> tuple[object, object]:
    from rayloop.rollout.controller import deploy
    from rayloop.rollout.fake_backend import FakeBackend
    from rayloop.serving.app import idle_state
    from rayloop.serving.protocol import ModelConfig
    from rayloop.serving.routing import STABLE, RouteTable

    settings = load_settings(env={"RAYLOOP_HOME": str(home)})
    reg = Registry.from_settings(settings)
    v1 = reg.register("demo", make_model_dir(tmp_path / "m1", seed=1))
    reg.register("demo", make_model_dir(tmp_path / "m2", seed=2))
    reg.set_alias("demo", "production", 1)
    cfg1 = ModelConfig(model="demo", version=1, fingerprint=v1.fingerprint)
    backend = FakeBackend(state=idle_state("demo", cfg1, RouteTable(versions={STABLE: 1})))
    first = deploy(settings, "demo@2", "rolling", interval_s=0.2, force=True, backend=backend)
    second = deploy(settings, "demo@1", "canary", steps=[100], interval_s=0.3, backend=backend)
    return first, second


def test_rollouts_list_and_show_the_timeline(rayloop_home: Path, tmp_path: Path) -> None:
    _, second = _two_rollouts(rayloop_home, tmp_path)
    r = CliRunner().invoke(cli, ["rollouts", "list", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [(x["id"], x["strategy"], x["status"]) for x in rows] == [
        (2, "canary", "succeeded"),
        (1, "rolling", "succeeded"),
    ]
    assert rows[0]["name"] == "demo" and rows[0]["from_version"] == 2 and rows[0]["to_version"] == 1
    shown = CliRunner().invoke(cli, ["rollouts", "show", "2", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["history"] == second.history  # type: ignore[attr-defined]
    text = CliRunner().invoke(cli, ["rollouts", "show", "2"])
    assert text.exit_code == 0 and text.output.startswith("rollout 2 of demo v2 -> v1 (canary): succeeded")
    events = [ln.split()[2] for ln in text.output.splitlines()[1:]]
    assert events[:2] == ["begin", "plan"] and "step_passed" in events and events[-1] == "end"
    missing = CliRunner().invoke(cli, ["rollouts", "show", "99"])
    assert missing.exit_code != 0 and "rollout 99 does not exist" in missing.output


def test_undeploy_deletes_the_app_and_forgets_its_deployments(tmp_path: Path) -> None:
    from rayloop.errors import RolloutInProgressError
    from rayloop.rollout.backend import ServeBackend
    from rayloop.rollout.controller import undeploy
    from rayloop.serving.app import AppState, ServeArgs, app_config
    from rayloop.serving.control import InMemoryControl
    from rayloop.serving.protocol import ModelConfig

    settings = load_settings(env={"RAYLOOP_HOME": str(tmp_path / "home")})
    reg = Registry.from_settings(settings)
    reg.register("demo", make_model_dir(tmp_path / "m1", seed=1))
    reg.mark_deployed("demo", 1, "stable", settings.serving.app_name)
    other = {"name": "someone-else", "import_path": "x:y"}
    state = AppState(model="demo", slots={"stable": ModelConfig(model="demo", version=1)})
    control = InMemoryControl([other, app_config(settings, ServeArgs(model="demo", settings=settings), state)])
    backend = ServeBackend(settings, control=control)

    rid = reg.begin_rollout("demo", from_version=None, to_version=1, strategy="canary", plan={}, owner="x:1")
    with pytest.raises(RolloutInProgressError, match="rollout 1 of 'demo' is running") as e:
        undeploy(settings, "demo", backend=backend)
    assert "rayloop abort demo" in (e.value.hint or "") and len(control.deployed) == 2
    reg.end_rollout(rid, "aborted")

    assert undeploy(settings, "demo", backend=backend) == {"model": "demo", "app": "rayloop", "removed": True}
    assert control.deployed == [other] and reg.deployments("demo") == []
    assert reg.list_versions("demo")[0].version == 1  # the registry keeps the version
    assert undeploy(settings, "demo", backend=backend)["removed"] is False


def test_staging_runs_its_own_uncaptured_app_on_its_own_route(tmp_path: Path) -> None:
    from rayloop.config import load_settings
    from rayloop.rollout.staging import staging_settings

    s = load_settings(env={"RAYLOOP_HOME": str(tmp_path)}, overrides={"serving": {"app_name": "llm", "replicas": 3}})
    staged = staging_settings(s)
    assert (staged.serving.app_name, staged.serving.route_prefix) == ("llm-staging", "/staging")
    assert staged.serving.replicas == 1 and staged.serving.capture is False
    assert staged.serving.base_url.endswith("/staging") and s.serving.base_url.endswith(str(s.serving.http_port))
    # Production's settings are untouched.
    assert (s.serving.app_name, s.serving.route_prefix, s.serving.replicas) == ("llm", "/", 3)


def test_deploy_to_staging_takes_no_rollout_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from rayloop.cli import cli

    monkeypatch.setenv("RAYLOOP_HOME", str(tmp_path))
    r = CliRunner().invoke(cli, ["deploy", "demo@2", "--env", "staging", "--strategy", "canary"])
    assert r.exit_code == 2 and "--env staging" in r.output


def test_deploy_progress_lines_say_what_serve_is_doing() -> None:
    from rayloop.rollout.cli import format_event

    line = format_event(
        {"time": 0.0, "rollout_id": 7, "event": "serve", "status": "llm-canary: UPDATING (1 STARTING, 1 RUNNING)"}
    )
    assert line.endswith("rollout 7: serve llm-canary: UPDATING (1 STARTING, 1 RUNNING)"), line
