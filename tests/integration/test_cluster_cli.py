"""`rayloop up` starts a head that outlives the CLI; `rayloop down` (or a SIGTERM to the head) drains it and
stops exactly it."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.serving_util import free_port


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_down_round_trip(tmp_path: Path, base_model_dir: Path) -> None:
    gcs, dash, agent, metrics = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "rayloop.yaml").write_text(
        f"ray:\n  port: {gcs}\n  dashboard_port: {dash}\n  dashboard_agent_port: {agent}\n  num_cpus: 1\n"
        f"  metrics_export_port: {metrics}\n"
    )
    # The embedded default, as after `rayloop demo`: RAYLOOP_HOME is ./.rayloop, relative to where `up` ran.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAYLOOP_")}
    cmd = [sys.executable, "-m", "rayloop.cli"]

    up = subprocess.run([*cmd, "up"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stderr
    state = json.loads((tmp_path / ".rayloop" / "cluster.json").read_text())
    try:
        assert state["address"] == f"127.0.0.1:{gcs}"
        # The CLI has exited; the head is still there and its dashboard answers.
        assert _group_alive(state["pid"])
        # Prometheus can scrape it: the generated config names the head's fixed metrics port, which serves
        # Ray's metrics.
        import yaml

        prom = yaml.safe_load((tmp_path / ".rayloop" / "monitoring" / "prometheus.yml").read_text())
        [target] = prom["scrape_configs"][0]["static_configs"][0]["targets"]
        assert target == f"127.0.0.1:{metrics}"
        scraped = httpx.get(f"http://{target}/metrics", timeout=30)
        assert scraped.status_code == 200 and "ray_" in scraped.text
        # Its dashboard answers, to the holder of the head's token only.
        assert httpx.get(f"http://127.0.0.1:{dash}/api/version", timeout=10).status_code == 401
        bearer = {"Authorization": f"Bearer {Path(state['auth_token_path']).read_text().strip()}"}
        r = httpx.get(f"http://127.0.0.1:{dash}/api/version", headers=bearer, timeout=10)
        assert r.status_code == 200 and r.json()["ray_version"]
        # A second `up` reports the running head instead of starting another.
        again = subprocess.run([*cmd, "up"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and f"pid {state['pid']}" in again.stdout
        # Other commands attach to it.
        probe = (
            "import ray, json; from rayloop.config import load_settings; from rayloop.cluster import connect; "
            "connect(load_settings()); print(json.dumps(ray.cluster_resources()))"
        )
        res = subprocess.run(
            [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.strip().splitlines()[-1])["CPU"] == 1.0
        # `ray job submit` works against it: the Jobs API goes through the head's dashboard agent. The job's
        # plain `python` is rayloop's environment, and its settings find this head's storage and registry
        # although it runs in a working directory of its own.
        probe_job = (
            "import ray, rayloop; from rayloop.config import load_settings; s = load_settings(); "
            "print(6 * 7, s.storage_root, s.registry_url)"
        )
        # Ray's token authentication is on: the token file is the owner's alone, and a client without it
        # is refused.
        token = Path(state["auth_token_path"])
        assert token.is_file() and (token.stat().st_mode & 0o777) == 0o600
        submit = f"ray job submit --working-dir . -- python -c {shlex.quote(probe_job)}"
        bare = subprocess.run(
            ["bash", "-c", f"RAY_API_SERVER_ADDRESS=http://127.0.0.1:{dash} RAY_AUTH_MODE=disabled {submit}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert bare.returncode != 0 and "42" not in bare.stdout, bare.stdout + bare.stderr
        # As the README shows it: the exports from `rayloop env`, then `ray job submit`.
        job = subprocess.run(
            ["bash", "-c", f'set -e; eval "$(rayloop env)"; {submit}'],
            cwd=tmp_path,
            env={**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout + job.stderr
        home = tmp_path / ".rayloop"
        assert f"42 {home / 'storage'} sqlite:///{home / 'registry.db'}" in job.stdout, job.stdout
        # The README's pipeline job, exactly: it runs rayloop's pipeline against this head's registry (where
        # demo@production is) and store (no feedback yet), and stops there, failing closed with what to do.
        for args in (
            ["models", "register", "demo", str(base_model_dir)],
            ["models", "alias", "demo", "production", "1"],
        ):
            r = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
        pipeline = subprocess.run(
            ["bash", "-c", 'eval "$(rayloop env)"\nray job submit --working-dir . -- python -m train_jobs.pipeline'],
            cwd=tmp_path,
            env={**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert pipeline.returncode != 0, pipeline.stdout + pipeline.stderr
        assert "only 0 feedback rows for model 'demo'" in pipeline.stdout + pipeline.stderr, (
            pipeline.stdout[-3000:] + pipeline.stderr[-3000:]
        )
    finally:
        ray_pid = int((tmp_path / ".rayloop" / "ray-head.pid").read_text())
        down = subprocess.run([*cmd, "down"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0 and "stopped" in down.stdout
    _wait_gone([state["pid"], ray_pid], 30)
    assert not (tmp_path / ".rayloop" / "cluster.json").exists()
    assert "draining Serve and the capture writer" in (tmp_path / ".rayloop" / "ray-head.log").read_text()


def _wait_gone(pgids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_group_alive(g) for g in pgids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_group_alive(g) for g in pgids), "processes of the head are still running"


_DEPLOY_FAKE = """
from rayloop.cluster import connect
from rayloop.config import load_settings
from rayloop.serving.deploy import deploy, model_config_for_path
from tests.integration.test_serving_fake import FAKE, _tiny_model

settings = load_settings()
connect(settings)
deploy(settings, model_config_for_path("demo", _tiny_model(settings.home_path / "m"), 1), engine_cls=FAKE, timeout_s=180)
print("DEPLOYED", flush=True)
"""


def test_sigterm_to_the_head_drains_capture_first(tmp_path: Path) -> None:
    """An init system or container runtime stops the head with SIGTERM to the PID `rayloop up` recorded: every
    answered request's row is in storage afterwards (replicas and the writer were drained before Ray stopped),
    although none had been flushed when the signal came."""
    from rayloop.data.capture import read_interactions

    gcs, dash, agent, metrics, http = (free_port() for _ in range(5))
    (tmp_path / "rayloop.yaml").write_text(
        f"ray:\n  port: {gcs}\n  dashboard_port: {dash}\n  dashboard_agent_port: {agent}\n  num_cpus: 1\n"
        f"  metrics_export_port: {metrics}\n"
        f"serving:\n  http_port: {http}\n  replicas: 1\n  replica_num_cpus: 0.1\n"
        "  capture_flush_s: 600\n  capture_batch_rows: 100000\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAYLOOP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    up = subprocess.run(
        [sys.executable, "-m", "rayloop.cli", "up"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert up.returncode == 0, up.stderr
    home = tmp_path / ".rayloop"
    state = json.loads((home / "cluster.json").read_text())
    ray_pid = int((home / "ray-head.pid").read_text())
    try:
        dep = subprocess.run(
            [sys.executable, "-c", _DEPLOY_FAKE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert dep.returncode == 0 and "DEPLOYED" in dep.stdout, dep.stdout[-2000:] + dep.stderr[-3000:]
        url = f"http://127.0.0.1:{http}/v1/chat/completions"
        answered = 0
        for i in range(12):
            body = {"model": "demo", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4}
            r = httpx.post(url, json=body, timeout=60)
            assert r.status_code == 200, r.text
            answered += 1
        assert read_interactions(str(home / "storage")).num_rows == 0  # all still buffered (replica, writer)
        os.kill(state["pid"], signal.SIGTERM)
        _wait_gone([state["pid"], ray_pid], 300)
    finally:
        subprocess.run([sys.executable, "-m", "rayloop.cli", "down"], cwd=tmp_path, env=env, timeout=300)
    log = (home / "ray-head.log").read_text()
    assert "SIGTERM: draining Serve and the capture writer" in log, log[-3000:]
    rows = read_interactions(str(home / "storage"))
    assert len(set(rows.column("request_id").to_pylist())) == answered, log[-3000:]
