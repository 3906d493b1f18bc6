"""The RayService manifest's serve config on a real Serve, with the FakeEngine (engine starts take a second):

- a restarted cluster (KubeRay re-applies ``serveConfigV2``) serves what the last rollout promoted, because the
  manifest names ``demo@production`` and the app resolves it each time it is built;
- with the manifest's Serve autoscaling, replicas added under load in the middle of a canary start on the
  version their slot serves.

The manifest is used as written, with this machine's stand-ins for the cluster's services (a local storage
root and SQLite instead of S3 and PostgreSQL, the CPU instead of GPUs, a token CPU share per replica) and a
scale-up that reacts at once.
"""

from __future__ import annotations

import copy
import json
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rayloop.config import Settings, settings_from_dict
from rayloop.registry import Registry
from rayloop.rollout.controller import deploy, send_command, status
from rayloop.serving.app import AppState, slot_deployment_name
from rayloop.serving.control import ServeControl, running_state
from rayloop.serving.routing import CANARY, STABLE
from tests.integration.rollout_util import wait_for
from tests.integration.serving_util import serve_http_url

ROOT = Path(__file__).resolve().parents[2]
APP = "rl-kuberay-test"
PREFIX = "/kuberay"
FAKE = "rayloop.serving.fake_engine:FakeEngine"


def _tiny_model(d: Path, seed: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes([seed]) * 16)
    return d


def _manifest_app(home: Path) -> dict[str, Any]:
    """The application of cluster/rayservice.yaml's serveConfigV2, with this machine's stand-ins."""
    doc = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    s = app["args"]["settings"]
    s["home"] = str(home)
    s["storage"] = {"root": str(home / "storage")}
    s["registry"] = {"url": f"sqlite:///{home / 'registry.db'}"}
    s["serving"].update(
        app_name=APP,
        route_prefix=PREFIX,
        http_host="127.0.0.1",
        replica_num_cpus=0.05,
        engine={"accelerator": "cpu"},
    )
    s["serving"]["autoscaling"].update(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0)
    app.update(name=APP, route_prefix=PREFIX)
    app["args"]["engine_cls"] = FAKE
    return dict(app)


@pytest.fixture(scope="module")
def cluster_env(ray_cluster: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("kuberay-home")
    app = _manifest_app(home)
    settings = settings_from_dict(app["args"]["settings"])
    reg = Registry.from_settings(settings)
    for seed in (1, 2, 3):
        reg.register("demo", _tiny_model(home / f"v{seed}", seed), parent=seed - 1 or None)
    for v in (2, 3):  # what `rayloop eval` records; rolling a version out over production needs it
        reg.annotate(f"demo@{v}", "gate", {"decision": "accepted", "reasons": []})
    reg.set_alias("demo", "production", 1)
    control = ServeControl(settings)
    try:
        yield {"app": app, "settings": settings, "reg": reg, "control": control}
    finally:
        control.remove(APP)


def _apply_manifest(env: dict[str, Any]) -> None:
    """What KubeRay does with serveConfigV2 on a new or restarted cluster: apply it through Serve's
    declarative API (here beside the other test modules' apps, which it keeps)."""
    env["control"].update(APP, lambda _deployed: copy.deepcopy(env["app"]))


def _state(control: ServeControl) -> AppState | None:
    """The app as rayloop's controllers see it (the manifest names no version: its replicas say which)."""
    app = next((a for a in control.apps() if a["name"] == APP), None)
    return None if app is None else running_state(app)


def _served_version(url: str) -> int | None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    except httpx.HTTPError:
        return None
    return int(r.headers["x-rayloop-model-version"]) if r.status_code == 200 else None


def _replicas(slot: str) -> dict[str, dict[str, Any]]:
    """replica id -> info of a slot's replicas (asks until every running replica has answered). The calls go
    out in concurrent batches: one at a time, an idle slot's router may send every call to the same replica."""
    from ray import serve

    running = serve.status().applications[APP].deployments[slot_deployment_name(slot)].replica_states.get("RUNNING", 0)
    h = serve.get_deployment_handle(slot_deployment_name(slot), APP)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(10):
        for info in [r.result(timeout_s=30) for r in [h.info.remote() for _ in range(2 * running + 2)]]:
            seen[info["replica"]] = info
        if len(seen) >= running:
            break
    return seen


def test_a_restarted_cluster_serves_what_the_last_rollout_promoted(cluster_env: dict[str, Any]) -> None:
    settings: Settings = cluster_env["settings"]
    reg = cluster_env["reg"]
    _apply_manifest(cluster_env)
    url = serve_http_url() + PREFIX
    wait_for(lambda: _served_version(url) == 1, 180, "the manifest's app to serve demo@production (v1)")

    rec = deploy(settings, "demo@2", "rolling")
    assert rec.status == "succeeded", rec
    assert reg.get_alias("demo", "production") == 2
    assert _served_version(url) == 2

    # The cluster restarts: its Serve apps are gone, and KubeRay applies the manifest again.
    assert cluster_env["control"].remove(APP)
    _apply_manifest(cluster_env)
    wait_for(lambda: _served_version(url) is not None, 180, "the re-applied manifest's app to serve")
    assert _served_version(url) == 2, "the restart undid the rollout"
    state = _state(cluster_env["control"])
    assert state is not None and state.version(STABLE) == 2


def test_replicas_added_mid_canary_start_on_their_slots_version(cluster_env: dict[str, Any]) -> None:
    settings: Settings = cluster_env["settings"]
    reg = cluster_env["reg"]
    control: ServeControl = cluster_env["control"]
    if _state(control) is None:
        _apply_manifest(cluster_env)  # run alone: serve what production names
        wait_for(lambda: _served_version(serve_http_url() + PREFIX) is not None, 180, "the manifest's app")
    production = reg.get_alias("demo", "production")
    out: dict[str, Any] = {}

    def run() -> None:
        out["rec"] = deploy(settings, "demo@3", "canary", steps=[50, 100], interval_s="10m")

    rollout = threading.Thread(target=run)
    rollout.start()
    try:
        wait_for(
            lambda: (st := _state(control)) is not None and st.version(CANARY) == 3 and st.table.canary_percent == 50,
            180,
            "the canary at 50%",
        )
        assert {i["version"] for i in _replicas(STABLE).values()} == {production}
        # Load above target_ongoing_requests: four slow requests at a time, half of them to the canary.
        stop = threading.Event()
        url = serve_http_url() + PREFIX
        body = {"model": "demo", "messages": [{"role": "user", "content": "__sleep__"}], "max_tokens": 2}

        def load() -> list[int]:
            codes = []
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    codes.append(c.post(url + "/v1/chat/completions", json=body).status_code)
            return codes

        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(load) for _ in range(4)]
            try:
                wait_for(
                    lambda: len(_replicas(STABLE)) == 2 and len(_replicas(CANARY)) == 2, 180, "two replicas per slot"
                )
            finally:
                stop.set()
            codes = [c for f in clients for c in f.result()]
        assert codes and set(codes) == {200}, f"requests failed while replicas were added: {codes}"
        for slot, want in ((STABLE, production), (CANARY, 3)):
            infos = _replicas(slot)
            assert len(infos) == 2
            assert {i["version"] for i in infos.values()} == {want}, (slot, infos)
            assert all(i["node_id"] for i in infos.values())
        assert reg.get_alias("demo", "production") == production  # mid-canary: production is still one version
        # `rayloop status` shows where each replica runs and what it serves.
        placed = status(settings, "demo")["replicas"]
        for slot, want in ((STABLE, production), (CANARY, 3)):
            running = [r for r in placed[slot] if r["state"] == "RUNNING"]
            assert len(running) == 2 and all(r["node_id"] and r["node_ip"] for r in running), placed
            assert {r["version"] for r in running if "version" in r} == {want}, placed  # those that answered
    finally:
        send_command(settings, "demo", "rollback", by="test", wait_s=120)
        rollout.join(120)
    assert out["rec"].status == "rolled_back"
    assert reg.get_alias("demo", "production") == production
    after = _state(control)
    assert after is not None and after.version(STABLE) == production
