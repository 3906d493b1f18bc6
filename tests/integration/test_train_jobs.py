"""`ray job submit` of the preprocess, retrain and pipeline jobs against a local head with a dashboard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from rayloop.config import load_settings
from rayloop.data.snapshot import storage_of
from rayloop.demo.setup import demo_eval_sets
from rayloop.demo.synthetic import write_interactions
from rayloop.demo.world import World
from rayloop.evaluation.evalset import save_eval_set
from tests.integration.serving_util import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job_head() -> object:
    """A separate Ray head with the dashboard (the Jobs API lives there), stopped by PID afterwards."""
    # A short temp dir: the dashboard's module sockets live under it, and an AF_UNIX path may not
    # exceed 107 bytes (pytest's tmp paths plus Ray's session name do).
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-jobs-", dir="/tmp"))
    port, dash = free_port(), free_port()
    # The dashboard agent's HTTP port defaults to 52365: a second cluster on this machine (the test
    # session's own) already holds it, this head's agent then never registers, and every submission
    # fails with "No available agent to submit job". Give this head's agent ports of its own.
    agent_http, agent_grpc, runtime_env, metrics = (free_port() for _ in range(4))
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # The head runs in this virtualenv, as a real cluster runs in its image: job entrypoints' `python`
    # is the venv's (pytest may have been started as .venv/bin/pytest without activating it).
    env["PATH"] = f"{ray_bin.parent}{os.pathsep}{env.get('PATH', '')}"
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
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            "--object-store-memory=300000000",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
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
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(url)
            client.list_jobs()
            break
        except Exception as e:
            client, last = None, e
            time.sleep(1)
    try:
        assert client is not None, f"the dashboard did not come up: {type(last).__name__}: {last}"
        yield client
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:  # anything of that head still alive (it runs in its own process group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(client: object, entrypoint: str, env: dict[str, str], timeout: float = 400) -> dict[str, Any]:
    logs = _run_logs(client, entrypoint, env, timeout)
    line = [ln for ln in logs.splitlines() if ln.startswith("RAYLOOP_RESULT ")][-1]
    out: dict[str, Any] = json.loads(line.removeprefix("RAYLOOP_RESULT "))
    return out


def _run_logs(client: object, entrypoint: str, env: dict[str, str], timeout: float = 400) -> str:
    """Submit ``entrypoint`` with this checkout as the working dir; wait for success; return the job's logs."""
    import requests
    from ray.job_submission import JobStatus

    # The Jobs REST API answers before the head's job agent has registered ("No available agent to
    # submit job, please try again later"), and a dashboard still starting its modules may drop the
    # connection: retry those for a while. A fixed submission id keeps a retry of a submission that did
    # arrive from starting the job twice.
    job = f"rayloop-test-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + 60
    while True:
        try:
            client.submit_job(  # type: ignore[attr-defined]
                entrypoint=entrypoint,
                submission_id=job,
                runtime_env={
                    "working_dir": str(REPO),
                    "env_vars": env,
                    "excludes": [".venv", ".git", ".rayloop", "**/__pycache__", "*.egg-info", ".mypy_cache"],
                },
            )
            break
        except (RuntimeError, requests.ConnectionError) as e:
            if "already exists" in str(e):  # an earlier try got through
                break
            retry = isinstance(e, requests.ConnectionError) or "No available agent" in str(e)
            if not retry or time.monotonic() > deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = client.get_job_status(job)  # type: ignore[attr-defined]
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs: str = client.get_job_logs(job)  # type: ignore[attr-defined]
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


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


def test_submit_pipeline_job_with_poisoned_feedback_deploys_nothing(
    job_head: object, base_model_dir: Path, tmp_path: Path
) -> None:
    """`ray job submit -- python -m train_jobs.pipeline`: collect -> ... -> gate as one Ray job, recorded.

    Users "corrected" answers with wrong facts: the candidate learns them, the gate must reject it, and
    the deploy stage (enabled) must not touch production.
    """
    from rayloop.registry import Registry

    home = tmp_path / "home"
    config = tmp_path / "rayloop.yaml"
    # Small retraining (CI time): wrong corrections make new-fact answers wrong however long it trains.
    config.write_text("training:\n  epochs: 2\n")
    settings = load_settings(config, env={"RAYLOOP_HOME": str(home)})
    reg = Registry.from_settings(settings)
    v1 = reg.register("demo", base_model_dir)
    reg.set_alias("demo", "production", v1.version)
    world = World.from_json((base_model_dir / "world.json").read_text())
    # The demo's fixed evaluation sets (true facts), as `rayloop demo` stores them.
    for name, items in demo_eval_sets(world).items():
        save_eval_set(storage_of(settings), "demo", name, items)
    write_interactions(storage_of(settings), world, n=300, covering=True, poison=True)
    env = {"RAYLOOP_HOME": str(home), "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}

    logs = _run_logs(job_head, f"python -m train_jobs.pipeline --config {config}", env, timeout=600)
    for stage in ("collect", "preprocess", "retrain", "register", "evaluate"):
        assert f"[pipeline] {stage}: done" in logs, (stage, logs[-3000:])
    # The run record is the JSON document the job prints last (Ray may log lines after it).
    record, _ = json.JSONDecoder().raw_decode(logs[logs.rindex("\n{") + 1 :])
    stages = record["stages"]
    cand = reg.resolve(stages["register"]["output"]["ref"])
    assert cand.version == 2 and cand.parent == 1
    assert cand.lineage["snapshot_id"] == stages["preprocess"]["output"]["snapshot_id"]
    gate = cand.annotations["gate"]
    assert gate["decision"] == "rejected", gate
    assert any("new_facts" in r for r in gate["reasons"]), gate["reasons"]
    # It did learn what users sent (its loss on the held-out interactions fell well below its parent's:
    # it answers in their words), but the facts it learned are wrong.
    report = cand.annotations["evaluation"]
    cand_sets, prod_sets = report["candidate"]["sets"], report["production"]["sets"]
    assert cand_sets["eval_split"]["loss"] < 0.5 * prod_sets["eval_split"]["loss"], (cand_sets, prod_sets)
    assert cand_sets["new_facts"]["accuracy"] < 0.5 and cand_sets["known_facts"]["accuracy"] >= 0.9
    # v1 was never served, so no fresh engine's golden answers exist to check a swap: the evaluation
    # engine was rebuilt on it (in the same actor, after the candidate's).
    prod_engine = report["production"]["engine"]
    assert [e["mode"] for e in prod_engine] == ["fresh"] and "no golden answers" in prod_engine[0]["reason"]
    assert stages["deploy"]["status"] == "skipped", stages["deploy"]
    assert "gate rejected" in stages["deploy"]["output"]["reason"], stages["deploy"]
    assert reg.get_alias("demo", "production") == 1
