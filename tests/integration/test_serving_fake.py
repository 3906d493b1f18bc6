"""The serving app on real Ray Serve with the FakeEngine (passed by name through the app args): fast paths
that a real engine cannot produce on demand — engine failure (500) and overload (503 + Retry-After)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from rayloop.config import load_settings
from rayloop.serving.deploy import deploy, model_config_for_path
from tests.integration.serving_util import free_port, serve_http_url

APP = "rl-serving-fake"
FAKE = "rayloop.serving.fake_engine:FakeEngine"


def _tiny_model(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return d


@pytest.fixture(scope="module")
def fake_app(ray_cluster: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The serving app with the fake engine: the stable replicas answer HTTP, canary and shadow idle."""
    from ray import serve

    home = tmp_path_factory.mktemp("fake-home")
    app = APP
    settings = load_settings(
        env={"RAYLOOP_HOME": str(home)},
        overrides={
            "serving": {
                "app_name": app,
                "route_prefix": "/fake",
                "http_port": free_port(),
                "replicas": 1,
                "replica_num_cpus": 0.1,
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
            }
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": settings.serving.http_port})
    cfg = model_config_for_path("demo", _tiny_model(home / "m"), 1)
    deploy(settings, cfg, engine_cls=FAKE, timeout_s=120)
    deployments = set(serve.status().applications[app].deployments)
    assert deployments == {"llm-stable", "llm-canary", "llm-shadow"}
    try:
        yield {"url": serve_http_url() + settings.serving.route_prefix, "settings": settings}
    finally:
        serve.delete(app)


def _chat(url: str, content: str) -> httpx.Response:
    body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_engine_failure_is_a_500_with_the_request_id(fake_app: dict[str, Any]) -> None:
    r = _chat(fake_app["url"], "__raise__")
    assert r.status_code == 500
    rid = r.headers["x-rayloop-request-id"]
    assert rid in r.json()["error"]["message"] and r.json()["error"]["type"] == "InternalServerError"
    assert r.headers["x-rayloop-model-version"] == "1"
    ok = _chat(fake_app["url"], "still alive?")  # the replica survived
    assert ok.status_code == 200 and ok.json()["model"] == "demo@v1"


def test_overload_is_a_503_with_retry_after(fake_app: dict[str, Any]) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _chat(fake_app["url"], "__sleep__"), range(8)))
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes, codes
    for r in results:
        if r.status_code == 503:
            assert "retry-after" in r.headers, (r.headers, r.text)
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "ServiceUnavailableError"
    assert _chat(fake_app["url"], "after the storm").status_code == 200


def test_graceful_shutdown_flushes_capture(ray_cluster: dict[str, object], tmp_path: Path) -> None:
    """After N requests and a clean stop, N interaction rows are in Parquet (nothing was flushed before)."""
    from ray import serve

    from rayloop.data.capture import read_interactions

    settings = load_settings(
        env={"RAYLOOP_HOME": str(tmp_path / "home")},
        overrides={
            "serving": {
                "app_name": "rl-serving-flush",
                "route_prefix": "/flush",
                "replicas": 1,
                "replica_num_cpus": 0.1,
                "capture_flush_s": 600,
                "capture_batch_rows": 1000,
            }
        },
    )
    deploy(settings, model_config_for_path("demo", _tiny_model(tmp_path / "m"), 1), engine_cls=FAKE, timeout_s=120)
    url = serve_http_url() + "/flush"
    n = 7
    for i in range(n):
        assert _chat(url, f"question {i}").status_code == 200
    assert read_interactions(settings.storage_root).num_rows == 0  # still buffered
    serve.delete("rl-serving-flush")
    assert read_interactions(settings.storage_root).num_rows == n
