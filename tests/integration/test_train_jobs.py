"""`ray job submit` of the preprocess and retrain jobs against a local head with a dashboard."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayloop.config import load_settings
from rayloop.data.snapshot import storage_of
from rayloop.data.synthetic import write_interactions
from rayloop.demo.world import World

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def job_head(tmp_path: Path) -> object:
    """A separate Ray head with the dashboard (the Jobs API lives there), stopped by PID afterwards."""
    port, dash = _free_port(), _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--object-store-memory=300000000",
            "--disable-usage-stats",
            f"--temp-dir={tmp_path / 'ray'}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    client = None
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(url)
            client.list_jobs()
            break
        except Exception:
            client = None
            time.sleep(1)
    try:
        assert client is not None, "the dashboard did not come up"
        yield client
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _run(client: object, entrypoint: str, env: dict[str, str], timeout: float = 400) -> dict[str, object]:
    from ray.job_submission import JobStatus

    job = client.submit_job(  # type: ignore[attr-defined]
        entrypoint=entrypoint,
        runtime_env={
            "working_dir": str(REPO),
            "env_vars": env,
            "excludes": [".venv", ".git", ".rayloop", "**/__pycache__", "*.egg-info", ".mypy_cache"],
        },
    )
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = client.get_job_status(job)  # type: ignore[attr-defined]
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(job)  # type: ignore[attr-defined]
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    line = [ln for ln in logs.splitlines() if ln.startswith("RAYLOOP_RESULT ")][-1]
    return json.loads(line.removeprefix("RAYLOOP_RESULT "))  # type: ignore[no-any-return]


def test_submit_preprocess_then_retrain(job_head: object, base_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = load_settings(env={"RAYLOOP_HOME": str(home)})
    world = World.from_json((base_model_dir / "world.json").read_text())
    write_interactions(storage_of(settings), world, n=300, covering=True)
    env = {"RAYLOOP_HOME": str(home), "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}

    pre = _run(job_head, f"python -m train_jobs.preprocess --base {base_model_dir}", env)
    sid = str(pre["snapshot_id"])
    assert (home / "storage" / "snapshots" / sid / "manifest.json").is_file()

    out = _run(
        job_head,
        f"python -m train_jobs.retrain --snapshot {sid} --base {base_model_dir} --workers 2 --zero-stage 2 "
        f"--set training.epochs=2 --set training.checkpoint_every=1000 --name demo --out {tmp_path / 'cand'}",
        env,
    )
    assert out["snapshot_id"] == sid and out["steps"] >= 1
    assert str(out["registered"]).startswith("demo@")
    assert (tmp_path / "cand" / "model.safetensors").is_file()
