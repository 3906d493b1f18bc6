"""The shipped Serve config, RayService and RayJob manifests validate against Ray's schema and rayloop's settings."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from rayloop.serving.app import ServeArgs, slot_deployment_name
from rayloop.serving.deploy import IMPORT_PATH
from rayloop.serving.protocol import ModelConfig
from rayloop.serving.routing import STABLE

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _check_serve_config(doc: dict[str, Any]) -> list[ServeArgs]:
    schema = ServeDeploySchema.model_validate(doc)
    out = []
    for app in schema.applications:
        assert app.import_path == IMPORT_PATH
        args = ServeArgs.model_validate(app.args)
        deps = {d.name: d for d in app.deployments}
        uc = deps[slot_deployment_name(STABLE)].user_config
        assert ModelConfig.model_validate(uc).model == args.name
        out.append(args)
    return out


def test_serve_config_yaml() -> None:
    (args,) = _check_serve_config(yaml.safe_load((CLUSTER / "serve-config.yaml").read_text()))
    assert args.settings.serving.engine.accelerator == "cpu"


def test_rayservice_manifest_gpu_tp2() -> None:
    doc = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    (args,) = _check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    es = args.settings.serving.engine
    assert es.accelerator == "gpu" and es.tensor_parallel_size == 2
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = [
        int(c["resources"]["limits"]["nvidia.com/gpu"]) for w in workers for c in w["template"]["spec"]["containers"]
    ]
    assert max(gpus) >= es.tensor_parallel_size  # one engine's shards fit on one worker pod
    assert doc["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"


def test_rayjob_manifest_runs_the_retrain_job_on_gpu_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from train_jobs.retrain import parse

    doc = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    env = runtime_env["env_vars"]
    # The entrypoint runs in a shell with the runtime env's variables.
    argv = shlex.split(os.path.expandvars(spec["entrypoint"].replace("$SNAPSHOT_ID", env["SNAPSHOT_ID"])))
    assert argv[:3] == ["python", "-m", "train_jobs.retrain"]
    for var in ("RAYLOOP_CONFIG", "RAYLOOP_HOME"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args, settings = parse(argv[3:])
    assert args.snapshot == env["SNAPSHOT_ID"] and args.gpu and args.base == "demo@production"
    assert settings.storage.root == env["RAYLOOP_STORAGE"] and settings.registry.url == env["RAYLOOP_REGISTRY_URL"]
    assert settings.training.bf16 is True
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * w["minReplicas"]
        for w in workers
        for c in w["template"]["spec"]["containers"]
    )
    assert args.workers is not None and gpus >= args.workers  # one GPU per Ray Train worker
    cpus = min(int(c["resources"]["limits"]["cpu"]) for w in workers for c in w["template"]["spec"]["containers"])
    assert settings.training.worker_num_cpus <= cpus
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
