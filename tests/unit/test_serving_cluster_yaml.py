"""The shipped cluster configs are what their tools accept: the Serve config against Ray's Serve schema and
rayloop's settings, the RayService and RayJob manifests against KubeRay's CRD schemas (a copy under
tests/data/kuberay-crds, with its license), the cluster launcher config against Ray's launcher schema, and
the Dockerfile against the repository it copies from."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from rayloop.serving.app import IMPORT_PATH, ServeArgs, slot_deployment_name
from rayloop.serving.protocol import parse_ref
from rayloop.serving.routing import STABLE

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CRDS = ROOT / "tests" / "data" / "kuberay-crds"


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields (as `kubectl apply --validate=strict` does; the API server
    would silently prune them, so a misspelt field would simply not take effect)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def _crd_validator(plural: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / f"ray.io_{plural}.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def _crd_errors(plural: str, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in _crd_validator(plural).iter_errors(doc)
    ]


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((CLUSTER / name).read_text())
    return doc


def _check_serve_config(doc: dict[str, Any]) -> list[ServeArgs]:
    """Ray's schema accepts it; each app is rayloop's, names its model by alias and pins no version."""
    schema = ServeDeploySchema.model_validate(doc)
    out = []
    for app in schema.applications:
        assert app.import_path == IMPORT_PATH
        args = ServeArgs.model_validate(app.args)
        _, ref = parse_ref(args.model)
        assert ref == "production", "the config names the alias, resolved each time Serve builds the app"
        pinned = [d.name for d in app.deployments if d.name == slot_deployment_name(STABLE) and d.user_config]
        assert not pinned, "a pinned version in the config would undo a rollout when the cluster restarts"
        out.append(args)
    return out


def _containers(pod_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for g in pod_groups for c in g["template"]["spec"]["containers"]]


def _check_secrets_from_kubernetes(doc: dict[str, Any], containers: list[dict[str, Any]]) -> dict[str, Any]:
    """Credentials reach every container from Secrets; none is written into the manifest."""
    text = json.dumps(doc)
    assert not re.search(r"postgres(ql)?://[^@/\"]*:[^@/\"]*@", text), "a password in a database URL"
    env_by_container = [{e["name"]: e for e in c.get("env", [])} for c in containers]
    for env in env_by_container:
        for var, secret in (
            ("PGPASSWORD", "rayloop-postgres"),
            ("AWS_ACCESS_KEY_ID", "rayloop-s3"),
            ("AWS_SECRET_ACCESS_KEY", "rayloop-s3"),
        ):
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == secret
            assert "value" not in env[var]
    return env_by_container[0]


def test_serve_config_yaml() -> None:
    (args,) = _check_serve_config(_load("serve-config.yaml"))
    assert args.settings.serving.engine.accelerator == "cpu"


def test_rayservice_manifest_is_valid_for_kuberay_and_serve() -> None:
    doc = _load("rayservice.yaml")
    assert _crd_errors("rayservices", doc) == []
    spec = doc["spec"]
    (args,) = _check_serve_config(yaml.safe_load(spec["serveConfigV2"]))
    s = args.settings
    assert s.storage.root is not None and s.storage.root.startswith("s3://")  # nothing on a node's disk
    assert s.registry.url is not None and s.registry.url.startswith("postgresql://")
    es = s.serving.engine
    assert es.accelerator == "gpu" and es.tensor_parallel_size == 2
    assert s.serving.autoscaling is not None and s.serving.autoscaling.min_replicas >= 2  # no single node serves

    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    workers = cluster["workerGroupSpecs"]
    for w in workers:
        gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in w["template"]["spec"]["containers"]]
        assert max(gpus) >= es.tensor_parallel_size  # one engine's shards fit on one pod (STRICT_PACK)
    # Two replicas at least, on pods of their own: the group can hold min_replicas engines.
    assert sum(w["maxReplicas"] for w in workers) >= s.serving.autoscaling.max_replicas
    env = _check_secrets_from_kubernetes(doc, _containers([cluster["headGroupSpec"], *workers]))
    assert env["RAYLOOP_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "rayloop-api-keys"
    assert s.serving.api_keys_env == "RAYLOOP_API_KEYS"
    assert env["RAYLOOP_HOME"]["value"] == "/var/lib/rayloop"  # the node-local model cache
    # The head's death does not end the cluster: Ray's control state lives in Redis, whose password is a
    # Kubernetes Secret; the head keeps the capture journal on a volume that outlives its container.
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and "value" not in ft["redisPassword"]
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]
    assert f"kubectl create secret generic {secret} " in (ROOT / "cluster" / "rayservice.yaml").read_text()
    head = cluster["headGroupSpec"]["template"]["spec"]
    (mount,) = [
        m for c in head["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/var/lib/rayloop"
    ]
    assert any(v["name"] == mount["name"] for v in head["volumes"])


def test_rayjob_takes_its_snapshot_as_a_parameter_and_trains_on_two_gpu_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from train_jobs.retrain import SNAPSHOT_ENV, parse

    doc = _load("rayjob.yaml")
    assert _crd_errors("rayjobs", doc) == []
    assert "generateName" in doc["metadata"] and "name" not in doc["metadata"]  # `kubectl create` per run
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"]
    workers = cluster["workerGroupSpecs"]
    env = _check_secrets_from_kubernetes(doc, _containers([cluster["headGroupSpec"], *workers]))
    snapshot = env[SNAPSHOT_ENV]["valueFrom"]["configMapKeyRef"]
    assert snapshot == {"name": "rayloop-retrain", "key": "snapshot"}
    assert "snapshot" not in spec["entrypoint"]  # the file is the same for every run

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "train_jobs.retrain"]
    for var in ("RAYLOOP_CONFIG", "RAYLOOP_HOME"):
        monkeypatch.delenv(var, raising=False)
    for k, v in yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(SNAPSHOT_ENV, "snap-20261202-abc")  # what the ConfigMap gives the pods
    args, settings = parse(argv[3:])
    assert args.snapshot == "snap-20261202-abc" and args.gpu and args.base == "demo@production"
    assert settings.storage.root == "s3://rayloop/storage" and settings.registry.url is not None
    assert settings.training.bf16 is True
    gpus = sum(
        int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * w["minReplicas"]
        for w in workers
        for c in w["template"]["spec"]["containers"]
    )
    assert args.workers == 2 and gpus >= args.workers  # one GPU per Ray Train worker, on two pods
    cpus = min(int(c["resources"]["limits"]["cpu"]) for c in _containers(workers))
    assert settings.training.worker_num_cpus <= cpus
    assert cluster["rayVersion"] == ray.__version__


def test_retrain_job_without_a_snapshot_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from rayloop.errors import ConfigError
    from train_jobs.retrain import SNAPSHOT_ENV, parse

    monkeypatch.delenv(SNAPSHOT_ENV, raising=False)
    with pytest.raises(ConfigError, match="no snapshot to train on") as e:
        parse(["--base", "demo@production"])
    assert SNAPSHOT_ENV in str(e.value.hint)


@pytest.mark.parametrize(
    ("plural", "file", "edit", "where"),
    [
        (
            "rayservices",
            "rayservice.yaml",
            lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replica=3),
            "workerGroupSpecs.0",
        ),
        ("rayservices", "rayservice.yaml", lambda d: d["spec"].update(serveConfig="x"), "spec"),
        (
            "rayjobs",
            "rayjob.yaml",
            lambda d: d["spec"].update(shutdownAfterJobFinishes="yes"),
            "shutdownAfterJobFinishes",
        ),
    ],
)
def test_the_crd_check_refuses_misspelt_and_mistyped_fields(plural: str, file: str, edit: Any, where: str) -> None:
    doc = copy.deepcopy(_load(file))
    edit(doc)
    errors = _crd_errors(plural, doc)
    assert errors and any(where in e for e in errors), errors


def test_cluster_launcher_config_is_valid_for_ray_up() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    doc = _load("launcher-aws.yaml")
    jsonschema.validate(doc, schema)
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["available_node_types"][doc["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no work
    assert (
        doc["docker"]["image"]
        == _load("rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "image"
        ]
    )
    for cmd in (*doc["head_start_ray_commands"], *doc["worker_start_ray_commands"]):
        if "ray start" in cmd:
            assert "RAYLOOP_HOME=/var/lib/rayloop" in cmd


def test_dockerfile_copies_what_exists_and_builds_the_images_the_manifests_name() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for line in text.splitlines():
        if line.startswith("COPY"):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        if line.startswith("ARG EXTRAS="):
            assert set(line.split("=", 1)[1].split(",")) <= extras
    for m in re.finditer(r"--build-arg EXTRAS=([\w,]+)", text):
        assert set(m.group(1).split(",")) <= extras
    assert f"rayproject/ray:{ray.__version__}-" in text
    documented = set(re.findall(r"-t (\S+) ", text))
    named = {
        c["image"]
        for f, key in (("rayservice.yaml", "rayClusterConfig"), ("rayjob.yaml", "rayClusterSpec"))
        for c in _containers([_load(f)["spec"][key]["headGroupSpec"], *_load(f)["spec"][key]["workerGroupSpecs"]])
    }
    assert named <= documented, f"manifests name {named - documented}, which the Dockerfile does not build"
