"""Serving end to end: real Ray Serve, real vLLM CPU engines, the official openai client.

One app (2 engine replicas) is shared by the whole module to keep engine starts
few; the upgrade tests run last because they change the served version.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rayloop.config import Settings, load_settings
from rayloop.data.capture import read_feedback, read_interactions
from rayloop.serving import golden
from rayloop.serving.deploy import deploy, model_config_for_path
from rayloop.storage import Storage
from tests.integration.serving_util import free_port, make_variant, serve_http_url

APP = "rl-serving-test"
API_KEY = "sk-test-serving-key"


@pytest.fixture(scope="module")
def serving(
    ray_cluster: dict[str, object], base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    from ray import serve

    home = tmp_path_factory.mktemp("serving-home")
    keys = home / "keys.txt"
    keys.write_text(f"# test keys\n{API_KEY}\n")
    settings = load_settings(
        env={"RAYLOOP_HOME": str(home)},
        overrides={
            "serving": {
                "app_name": APP,
                "route_prefix": "/",
                "http_port": free_port(),
                "replicas": 2,
                "replica_num_cpus": 0.5,
                "capture_flush_s": 0.5,
                "capture_batch_rows": 8,
                "api_keys_file": str(keys),
                "max_queued_requests": 64,
                "engine": {"kv_cache_gib": 1, "max_model_len": 256, "max_num_seqs": 16},
            }
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": settings.serving.http_port})
    v1 = model_config_for_path("demo", base_model_dir, 1)
    t0 = time.monotonic()
    result = deploy(settings, v1, timeout_s=300)
    print(f"first deploy took {time.monotonic() - t0:.1f}s")
    url = serve_http_url()
    try:
        yield {"settings": settings, "url": url, "v1": v1, "result": result, "base": base_model_dir, "tmp": home}
    finally:
        serve.delete(APP)


def _client(url: str, key: str = API_KEY) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _flush(url: str) -> None:
    r = httpx.post(url + "/rayloop/flush", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text


def _storage(settings: Settings) -> Storage:
    return Storage(settings.storage_root)


def test_first_deploy_loaded_v1_on_both_replicas(serving: dict[str, Any]) -> None:
    res = serving["result"]
    assert res.version == 1 and res.upgraded_from is None
    assert {r["version"] for r in res.replicas} == {1}
    assert all(r["last_swap"]["mode"] == "fresh" for r in res.replicas)
    # A fresh engine recorded the version's golden answers.
    rec = golden.load_golden(_storage(serving["settings"]), serving["v1"].fingerprint, serving["settings"].serving.engine)
    assert rec is not None and len(rec.outputs) == len(golden.PROMPTS)


def test_chat_completion_feedback_and_capture_through_openai_client(serving: dict[str, Any]) -> None:
    url, settings = serving["url"], serving["settings"]
    client = _client(url)

    raw = client.chat.completions.with_raw_response.create(
        model="demo",
        messages=[{"role": "user", "content": "What is the capital of Zorbia?"}],
        max_tokens=16,
        temperature=0,
        extra_headers={"x-rayloop-session-id": "sess-1", "x-rayloop-user-id": "user-1"},
    )
    chat = raw.parse()
    chat_rid = raw.headers["x-rayloop-request-id"]
    assert raw.headers["x-rayloop-model-version"] == "1"
    assert chat.model == "demo@v1"
    assert chat.id == f"chatcmpl-{chat_rid}"
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens > 0

    # Streaming chat (SSE) through the same client.
    with client.chat.completions.with_streaming_response.create(
        model="demo@v1", messages=[{"role": "user", "content": "Who rules Voubos?"}], max_tokens=12, temperature=0, stream=True
    ) as resp:
        stream_rid = resp.headers["x-rayloop-request-id"]
        assert resp.headers["x-rayloop-model-version"] == "1"
        chunks = list(resp.parse())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed and all(c.model == "demo@v1" for c in chunks)

    raw = client.completions.with_raw_response.create(model="demo", prompt="The capital of Zorbia is", max_tokens=8, temperature=0)
    comp = raw.parse()
    comp_rid = raw.headers["x-rayloop-request-id"]
    assert comp.model == "demo@v1" and comp.choices[0].text

    chunks2 = list(client.completions.create(model="demo", prompt="Voubos is", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks2)

    models = client.models.list()
    assert {m.id for m in models.data} >= {"demo@v1", "demo"}

    # Feedback: by our request id and by the response id; unknown ids are 404.
    fb = httpx.post(
        url + "/v1/feedback",
        json={"request_id": chat_rid, "rating": 1, "user_id": "user-1"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert fb.status_code == 200, fb.text
    assert fb.headers["x-rayloop-model-version"] == "1"
    fb2 = httpx.post(
        url + "/v1/feedback",
        json={"request_id": f"chatcmpl-{stream_rid}", "rating": -1, "correction": "Voubos is ruled by Queen X."},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert fb2.status_code == 200, fb2.text
    missing = httpx.post(
        url + "/v1/feedback", json={"request_id": "no-such-request", "rating": 1}, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "request_id"

    _flush(url)
    rows = {r["request_id"]: r for r in read_interactions(_storage(settings)).to_pylist()}
    assert {chat_rid, stream_rid, comp_rid} <= set(rows)
    r = rows[chat_rid]
    assert r["model_name"] == "demo" and r["model_version"] == 1 and r["version"] == 1 and r["model"] == "demo"
    assert r["endpoint"] == "chat" and r["status"] == "ok" and r["slot"] == "stable"
    assert r["session_id"] == "sess-1" and r["user_id"] == "user-1"
    assert json.loads(r["messages"])[0]["content"] == "What is the capital of Zorbia?"
    assert r["completion"] == chat.choices[0].message.content
    assert r["completion_tokens"] == chat.usage.completion_tokens
    assert r["prompt_tokens"] == chat.usage.prompt_tokens
    assert r["latency_ms"] > 0 and r["ttft_ms"] is not None and r["ttft_ms"] <= r["latency_ms"]
    assert json.loads(r["sampling_params"])["max_tokens"] == 16
    assert rows[stream_rid]["completion"] == streamed
    assert rows[comp_rid]["endpoint"] == "completion" and rows[comp_rid]["prompt"] == "The capital of Zorbia is"

    fbs = {f["request_id"]: f for f in read_feedback(_storage(settings)).to_pylist()}
    assert fbs[chat_rid]["rating"] == 1 and fbs[chat_rid]["model_version"] == 1 and fbs[chat_rid]["user_id"] == "user-1"
    assert fbs[stream_rid]["rating"] == -1 and fbs[stream_rid]["correction"] == "Voubos is ruled by Queen X."


def test_api_keys_required(serving: dict[str, Any]) -> None:
    url = serving["url"]
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
    bad = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200  # probes need no key


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", {"model": "demo"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "demo", "messages": "hi"}, 400, "messages"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "demo", "prompt": "word " * 400, "max_tokens": 4}, 400, None),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"model": 7, "messages": []}, 400, "model"),
        ("/v1/feedback", {"request_id": "x", "rating": 5}, 400, "rating"),
        ("/v1/feedback", {"request_id": "x"}, 400, None),
    ],
)
def test_bad_input_gets_openai_errors(serving: dict[str, Any], path: str, body: Any, status: int, param: str | None) -> None:
    url = serving["url"]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    assert r.headers["x-rayloop-request-id"]


def test_replicas_survive_bad_input(serving: dict[str, Any]) -> None:
    client = _client(serving["url"])
    out = client.completions.create(model="demo", prompt="Voubos is", max_tokens=4, temperature=0)
    assert out.choices[0].text is not None
    health = httpx.get(serving["url"] + "/healthz").json()
    assert health["status"] == "ok" and health["slots"]["stable"]["version"] == 1
