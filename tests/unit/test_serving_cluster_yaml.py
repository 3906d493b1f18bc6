"""The shipped Serve config and RayService manifest validate against Ray's schema and rayloop's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ray.serve.schema import ServeDeploySchema

from rayloop.serving.app import STABLE_SLOT, ServeArgs, slot_deployment_name
from rayloop.serving.deploy import IMPORT_PATH
from rayloop.serving.protocol import ModelConfig

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _check_serve_config(doc: dict[str, Any]) -> list[ServeArgs]:
    schema = ServeDeploySchema.model_validate(doc)
    out = []
    for app in schema.applications:
        assert app.import_path == IMPORT_PATH
        args = ServeArgs.model_validate(app.args)
        deps = {d.name: d for d in app.deployments}
        uc = deps[slot_deployment_name(STABLE_SLOT)].user_config
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
