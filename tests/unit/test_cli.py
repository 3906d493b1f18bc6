import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rayloop.cli import cli


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from rayloop.cli import cli; "
        "import click.testing as t; r = t.CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('ray', 'torch', 'vllm', 'deepspeed', 'transformers', 'pyarrow') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_config_show_json(rayloop_home: Path) -> None:
    r = CliRunner().invoke(cli, ["config", "show"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["home"] == str(rayloop_home)
    assert data["registry"]["url"].startswith("sqlite:///")


def test_user_error_is_one_line_with_hint(rayloop_home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray:\n  num_cpu: 2\n")
    env = {**os.environ, "RAYLOOP_HOME": str(rayloop_home)}
    env.pop("RAYLOOP_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "rayloop.cli", "--config", str(bad), "config", "show"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("ConfigError: invalid settings in")
    assert "unknown key 'ray.num_cpu'" in r.stderr
    assert "hint:" in r.stderr
    assert "Traceback" not in r.stderr

    env["RAYLOOP_DEBUG"] = "1"
    r = subprocess.run(
        [sys.executable, "-m", "rayloop.cli", "--config", str(bad), "config", "show"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_down_without_up_is_harmless(rayloop_home: Path) -> None:
    r = CliRunner().invoke(cli, ["down"])
    assert r.exit_code == 0
    assert "No Ray head" in r.output


def test_up_refuses_a_dashboard_agent_port_another_cluster_holds(
    rayloop_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = tmp_path / "rayloop.yaml"
        config.write_text(f"ray:\n  dashboard_agent_port: {port}\n")
        monkeypatch.setenv("RAYLOOP_CONFIG", str(config))
        r = CliRunner().invoke(cli, ["up"])
    assert r.exit_code != 0
    assert f"port {port} (ray.dashboard_agent_port) is already in use" in r.output
    assert "ray.dashboard_agent_port in rayloop.yaml" in r.output
    assert not (rayloop_home / "cluster.json").exists(), "no head may be recorded when none was started"


def test_engine_logs_go_to_stderr_so_json_output_parses(rayloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM logs to stdout by default, which broke `rayloop eval --local --json`.
    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)
    r = CliRunner().invoke(cli, ["config", "show"])
    assert r.exit_code == 0 and os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"
    monkeypatch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stdout")  # an explicit choice is kept
    CliRunner().invoke(cli, ["config", "show"])
    assert os.environ["VLLM_LOGGING_STREAM"] == "ext://sys.stdout"


def test_json_commands_keep_stdout_for_the_result() -> None:
    # Libraries write to stdout from Python and from C (vLLM, Ray, DeepSpeed): with --json all of it goes
    # to stderr and stdout is exactly the JSON document.
    code = """
import os, click
from rayloop.cli import cli
from rayloop.clisupport import print_json

@cli.command("noisy")
@click.option("--json", "as_json", is_flag=True)
def noisy(as_json):
    os.write(1, b"C-level noise\\n")
    print("python noise")
    print_json({"ok": 1})

cli.main(["noisy", "--json"], standalone_mode=False)
print("after")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "after"
    assert json.loads(out.stdout.rsplit("after", 1)[0]) == {"ok": 1}
    assert "C-level noise" in out.stderr and "python noise" in out.stderr


def test_json_commands_disconnect_ray_before_stdout_is_restored() -> None:
    # Ray's driver prints worker and raylet log lines on stdout from a thread, at any time: a line arriving
    # after the command must not land after the JSON document (a stand-in `ray` plays the log thread).
    code = """
import sys, threading, time, types, click
from rayloop.cli import cli
from rayloop.clisupport import print_json

stop = threading.Event()
def logs():
    while not stop.is_set():
        print("(raylet) late log line", flush=True)
        time.sleep(0.005)
ray = types.ModuleType("ray")
ray.is_initialized = lambda: not stop.is_set()
ray.shutdown = stop.set
sys.modules["ray"] = ray

@cli.command("talks")
@click.option("--json", "as_json", is_flag=True)
def talks(as_json):
    threading.Thread(target=logs, daemon=True).start()
    time.sleep(0.05)
    print_json({"ok": 1})

cli.main(["talks", "--json"], standalone_mode=False)
time.sleep(0.05)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"ok": 1}
    assert "late log line" in out.stderr


def test_python_dash_m_json_output_is_on_stdout(rayloop_home: Path) -> None:
    # `python -m rayloop.cli` (how the tests and `ray job submit` run it) loads the module twice.
    out = subprocess.run(
        [sys.executable, "-m", "rayloop.cli", "status", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "RAYLOOP_HOME": str(rayloop_home)},
    )
    assert json.loads(out.stdout)["serve"] is None, out.stderr[-2000:]


def test_config_schema_prints_only_the_json_schema(tmp_path: Path) -> None:
    # Works where the settings themselves do not load (an editor or CI checks the file with it).
    import rayloop

    (tmp_path / "rayloop.yaml").write_text("serving:\n  http_port: not-a-port\n")
    repo = Path(rayloop.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "RAYLOOP_SERVING__HTTP_PORT": "also-bad"}
    r = subprocess.run(
        [sys.executable, "-m", "rayloop.cli", "config", "schema"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    )
    schema = json.loads(r.stdout)  # nothing but the document on stdout
    assert schema["properties"]["serving"]["$ref"] == "#/$defs/ServingSettings"
    http_port = schema["$defs"]["ServingSettings"]["properties"]["http_port"]
    assert http_port["type"] == "integer" and http_port["default"] == 8000
    assert http_port["description"]


def test_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    import rayloop

    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0
    assert r.stdout == f"rayloop {importlib.metadata.version('rayloop')}\n"

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    r = CliRunner().invoke(cli, ["--version", "config", "show"])  # eager: nothing else runs
    assert r.exit_code == 0 and r.stdout == f"rayloop {rayloop.__version__}\n"


def test_env_var_reaches_config_show(rayloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYLOOP_SERVING__HTTP_PORT", "9000")
    monkeypatch.setenv("RAYLOOP_TRAINING__ZERO_STAGE", "3")
    r = CliRunner().invoke(cli, ["config", "show"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["serving"]["http_port"] == 9000 and data["training"]["zero_stage"] == 3


def test_bad_env_var_is_one_line_naming_it(rayloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYLOOP_DEBUG", raising=False)
    monkeypatch.setenv("RAYLOOP_SERVING__HTTP_PORT", "70000")
    r = CliRunner().invoke(cli, ["config", "show"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("ConfigError: invalid settings in environment variable RAYLOOP_SERVING__HTTP_PORT: ")


def test_data_preprocess_and_train_write_their_json_on_stdout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--json` output is the only thing on stdout (piping to jq works), for the data and train commands too."""
    from types import SimpleNamespace

    import rayloop.data.preprocess as preprocess_mod
    import rayloop.registry.parent as parent_mod
    import rayloop.training.candidate as candidate_mod

    monkeypatch.setenv("RAYLOOP_HOME", str(tmp_path))
    monkeypatch.setattr(parent_mod, "resolve_parent", lambda s, name, base: (str(tmp_path), "demo"))
    info = SimpleNamespace(manifest={"snapshot_id": "abc"}, counts={}, snapshot_id="abc", reused=False, uri="u")
    monkeypatch.setattr(preprocess_mod, "preprocess", lambda *a, **k: info)
    r = CliRunner().invoke(cli, ["data", "preprocess", "--no-replay", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"snapshot_id": "abc"}

    monkeypatch.setattr(candidate_mod, "run_train", lambda *a, **k: {"registered": 2})
    r = CliRunner().invoke(cli, ["train", "--snapshot", "abc", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"registered": 2}


def test_exit_codes_say_what_happened() -> None:
    from rayloop.cli import pipeline_exit_code
    from rayloop.clisupport import ExitCode
    from rayloop.rollout.cli import _finish

    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4]
    rejected = {"stages": {"evaluate": {"output": {"decision": "rejected"}}}}
    rolled_back = {
        "stages": {"evaluate": {"output": {"decision": "accepted"}}, "deploy": {"output": {"status": "rolled_back"}}}
    }
    assert pipeline_exit_code(rejected) == 3 and pipeline_exit_code(rolled_back) == 4
    assert pipeline_exit_code({"stages": {"deploy": {"output": {"status": "succeeded"}}}}) == 0
    from rayloop.registry import RolloutState
    from tests.registry_util import finished_rollout

    record = finished_rollout(state=RolloutState(), status="running")
    for status, code in (("rolled_back", 4), ("aborted", 4)):
        with pytest.raises(SystemExit) as e:
            _finish(record.model_copy(update={"status": status}), as_json=True)
        assert e.value.code == code
    _finish(record.model_copy(update={"status": "succeeded"}), as_json=True)  # no exit: 0
    # A bad flag is a usage error (2), not a rayloop error (1), and its hint does not point at rayloop.yaml.
    r = CliRunner().invoke(cli, ["deploy", "demo@2", "--strategy", "linear"])
    assert r.exit_code == 2 and "rayloop.yaml" not in r.output


def test_init_stores_the_eval_sets_the_gate_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rayloop eval` right after `rayloop init` has sets to judge by (the README quickstart relies on it)."""
    from rayloop.config import load_settings
    from rayloop.evaluation.evalset import load_eval_sets
    from rayloop.storage import Storage

    monkeypatch.setenv("RAYLOOP_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(cli, ["init", "--steps", "2", "--json"])
    assert r.exit_code == 0, r.output
    names = json.loads(r.stdout)["eval_sets"]
    settings = load_settings(env={"RAYLOOP_HOME": str(tmp_path / "home")})
    stored = load_eval_sets(Storage(settings.storage_root), "demo")
    assert sorted(stored) == names and "new_facts" in names and all(stored[n] for n in names)


def test_init_copies_a_build_of_the_same_recipe_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second `rayloop init` on the machine copies the first build instead of pre-training again; another recipe,
    --no-cache and --force build."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def init(home: str, *flags: str) -> dict[str, object]:
        monkeypatch.setenv("RAYLOOP_HOME", str(tmp_path / home))
        r = CliRunner().invoke(cli, ["init", "--steps", "2", "--json", *flags])
        assert r.exit_code == 0, r.output
        return dict(json.loads(r.stdout))

    first = init("a")
    assert "cached_build" not in first
    entries = list((tmp_path / "cache" / "rayloop" / "demo-models").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    second = init("b")
    assert second["cached_build"] == str(entries[0])
    for f in ("model.safetensors", "tokenizer.json", "world.json", "rayloop_build.json"):
        assert (tmp_path / "a" / "base-model" / f).read_bytes() == (tmp_path / "b" / "base-model" / f).read_bytes(), f
    assert "cached_build" not in init("c", "--no-cache") and "cached_build" not in init("d", "--force")
    monkeypatch.setenv("RAYLOOP_HOME", str(tmp_path / "e"))
    r = CliRunner().invoke(cli, ["init", "--steps", "3", "--json"])  # another recipe: another entry
    assert r.exit_code == 0 and "cached_build" not in json.loads(r.stdout)
    assert len(list((tmp_path / "cache" / "rayloop" / "demo-models").iterdir())) == 2
