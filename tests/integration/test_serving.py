"""Serving end to end: real Ray Serve, real vLLM CPU engines, the official openai client.

One app (2 engine replicas) is shared by the whole module to keep engine starts
few; the upgrade tests run last because they change the served version.
"""

from __future__ import annotations

import json
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
    rec = golden.load_golden(
        _storage(serving["settings"]), serving["v1"].fingerprint, serving["settings"].serving.engine
    )
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
        model="demo@v1",
        messages=[{"role": "user", "content": "Who rules Voubos?"}],
        max_tokens=12,
        temperature=0,
        stream=True,
    ) as resp:
        stream_rid = resp.headers["x-rayloop-request-id"]
        assert resp.headers["x-rayloop-model-version"] == "1"
        chunks = list(resp.parse())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed and all(c.model == "demo@v1" for c in chunks)

    raw = client.completions.with_raw_response.create(
        model="demo", prompt="The capital of Zorbia is", max_tokens=8, temperature=0
    )
    comp = raw.parse()
    comp_rid = raw.headers["x-rayloop-request-id"]
    assert comp.model == "demo@v1" and comp.choices[0].text

    chunks2 = list(client.completions.create(model="demo", prompt="Voubos is", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks2)

    models = client.models.list()
    assert {m.id for m in models.data} >= {"demo@v1", "demo"}

    # Several choices: n > 1 (plain and streamed) and a batch of prompts. Each choice's own text is kept.
    raw = client.chat.completions.with_raw_response.create(
        model="demo",
        messages=[{"role": "user", "content": "Tell me about Thusvun."}],
        max_tokens=6,
        n=2,
        temperature=1.0,
        seed=7,
    )
    multi, multi_rid = raw.parse(), raw.headers["x-rayloop-request-id"]
    multi_texts = [c.message.content for c in sorted(multi.choices, key=lambda c: c.index)]
    with client.chat.completions.with_streaming_response.create(
        model="demo",
        messages=[{"role": "user", "content": "Who rules Voubos?"}],
        max_tokens=6,
        n=2,
        temperature=1.0,
        seed=7,
        stream=True,
    ) as resp:
        multi_stream_rid = resp.headers["x-rayloop-request-id"]
        parts: dict[int, str] = {}
        for c in resp.parse():
            for ch in c.choices:
                parts[ch.index] = parts.get(ch.index, "") + (ch.delta.content or "")
    raw = client.completions.with_raw_response.create(
        model="demo", prompt=["The capital of Zorbia is", "Voubos is"], max_tokens=4, temperature=0
    )
    batch, batch_rid = raw.parse(), raw.headers["x-rayloop-request-id"]
    batch_texts = [c.text for c in sorted(batch.choices, key=lambda c: c.index)]

    # Opted out: answered as usual, nothing of it stored, so feedback on it finds nothing.
    raw = client.chat.completions.with_raw_response.create(
        model="demo",
        messages=[{"role": "user", "content": "my secret question"}],
        max_tokens=4,
        extra_headers={"x-rayloop-capture": "off"},
    )
    private_rid = raw.headers["x-rayloop-request-id"]
    assert raw.parse().choices[0].message.content is not None

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
        url + "/v1/feedback",
        json={"request_id": "no-such-request", "rating": 1},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "request_id"

    _flush(url)
    rows = {r["request_id"]: r for r in read_interactions(_storage(settings)).to_pylist()}
    assert {chat_rid, stream_rid, comp_rid} <= set(rows)
    assert private_rid not in rows and not any("my secret question" in (r["messages"] or "") for r in rows.values())
    nothing = httpx.post(
        url + "/v1/feedback",
        json={"request_id": private_rid, "rating": 1},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert nothing.status_code == 404
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
    assert rows[stream_rid]["completion"] == streamed and rows[stream_rid]["choices"] is None
    assert json.loads(rows[multi_rid]["choices"]) == multi_texts and rows[multi_rid]["completion"] == multi_texts[0]
    assert json.loads(rows[multi_stream_rid]["choices"]) == [parts[0], parts[1]]
    assert json.loads(rows[batch_rid]["choices"]) == batch_texts and len(batch_texts) == 2
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
    probe = httpx.get(url + "/healthz")  # probes need no key, and learn nothing else
    assert probe.status_code == 200 and probe.json() == {"status": "ok"}


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
        ("/v1/completions", {"model": "demo"}, 400, "prompt"),  # vLLM raises for it (found by the fuzz)
        ("/v1/chat/completions", {"model": 7, "messages": []}, 400, "model"),
        ("/v1/feedback", {"request_id": "x", "rating": 5}, 400, "rating"),
        ("/v1/feedback", {"request_id": "x"}, 400, None),
    ],
)
def test_bad_input_gets_openai_errors(
    serving: dict[str, Any], path: str, body: Any, status: int, param: str | None
) -> None:
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
    health = httpx.get(serving["url"] + "/healthz", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert health["status"] == "ok" and health["slots"]["stable"]["version"] == 1


def _scrape() -> dict[str, list[Any]]:
    """Ray's Prometheus endpoint on this node, parsed: metric name -> samples."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_metrics_on_ray_prometheus_endpoint(serving: dict[str, Any]) -> None:
    client = _client(serving["url"])
    client.completions.create(model="demo", prompt="Voubos is", max_tokens=4, temperature=0)
    deadline = time.monotonic() + 90
    want = (
        "ray_rayloop_requests_total",
        "ray_rayloop_request_duration_seconds_bucket",
        "ray_rayloop_time_to_first_token_seconds_bucket",
        "ray_rayloop_time_per_output_token_seconds_bucket",
        "ray_rayloop_prompt_tokens_total",
        "ray_rayloop_generation_tokens_total",
        "ray_rayloop_feedback_total",
        "ray_rayloop_requests_in_flight",
        "ray_rayloop_weight_swaps_total",
        "ray_rayloop_weight_swap_duration_seconds_count",
        "ray_rayloop_traffic_weight",
        "ray_rayloop_engine_info",
        "ray_vllm_kv_cache_usage_perc",
        "ray_vllm_num_requests_running",
        "ray_vllm_request_success_total",
    )
    metrics: dict[str, list[Any]] = {}

    def complete(m: dict[str, list[Any]]) -> bool:
        # Each replica exports on its own schedule: wait for the 400s and both replicas' first loads too.
        return (
            all(w in m for w in want)
            and any(s.labels.get("code") == "400" for s in m["ray_rayloop_requests_total"])
            and sum(s.value for s in m["ray_rayloop_weight_swaps_total"] if s.labels.get("mode") == "fresh") >= 2
            and len({s.labels.get("ReplicaId") for s in m["ray_vllm_kv_cache_usage_perc"]}) >= 2
        )

    while time.monotonic() < deadline:
        metrics = _scrape()
        if complete(metrics):
            break
        time.sleep(3)
    missing = [w for w in want if w not in metrics]
    assert not missing, (missing, sorted(k for k in metrics if "rayloop" in k or "vllm" in k))
    ok = [
        s
        for s in metrics["ray_rayloop_requests_total"]
        if s.labels.get("code") == "200" and s.labels.get("version") == "1"
    ]
    assert ok and sum(s.value for s in ok) >= 3
    assert all(s.labels["model"] == "demo" and s.labels["slot"] == "stable" for s in ok)
    assert all(s.labels["status_class"] == "2xx" and s.labels.get("replica") for s in ok), "Serve's labels too"
    bad = [s for s in metrics["ray_rayloop_requests_total"] if s.labels.get("code") == "400"]
    assert bad and all(s.labels["status_class"] == "4xx" for s in bad), "the bad-input tests' 400s are counted too"
    assert any(
        s.value >= 1
        for s in metrics["ray_rayloop_feedback_total"]
        if (s.labels["version"], s.labels["rating"]) == ("1", "1")
    )
    assert any(s.value > 0 for s in metrics["ray_rayloop_generation_tokens_total"] if s.labels.get("version") == "1")
    # Latency in seconds: a tiny model on CPU answers within seconds, so (almost) all are under 30 s and
    # none under 1 ms (milliseconds in a seconds histogram would be the other way round).
    buckets = {
        s.labels["le"]: s.value
        for s in metrics["ray_rayloop_request_duration_seconds_bucket"]
        if s.labels.get("endpoint") == "completion" and s.labels.get("version") == "1"
    }
    assert buckets and buckets.get("0.005", 0.0) < buckets.get("+Inf", 0.0), buckets
    fresh = [s for s in metrics["ray_rayloop_weight_swaps_total"] if s.labels.get("mode") == "fresh"]
    assert sum(s.value for s in fresh) >= 2  # both replicas
    # The version comes from rayloop: each engine replica says which version it serves, keyed like vLLM's
    # own series (ReplicaId), and all the traffic is on the stable slot.
    info = {s.labels["ReplicaId"]: s.labels["version"] for s in metrics["ray_rayloop_engine_info"] if s.value == 1}
    kv = {s.labels["ReplicaId"] for s in metrics["ray_vllm_kv_cache_usage_perc"]}
    assert len(info) >= 2 and kv <= set(info), (info, kv)
    weights = [s for s in metrics["ray_rayloop_traffic_weight"] if s.value > 0]
    assert weights and all((s.labels["slot"], s.value) == ("stable", 1.0) for s in weights), weights


def test_tensor_parallel_2_gives_the_same_greedy_output(serving: dict[str, Any]) -> None:
    """TP=2 on CPU (VLLM_CPU_OMP_THREADS_BIND="0|1" through runtime_env) inside Serve matches TP=1."""
    from ray import serve

    base: Settings = serving["settings"]
    data = base.dump()
    data["serving"].update({"app_name": "rl-serving-tp2", "route_prefix": "/tp2", "replicas": 1})
    data["serving"]["engine"].update({"tensor_parallel_size": 2, "cpu_threads_bind": "0|1"})
    tp2 = Settings.model_validate(data)
    try:
        res = deploy(tp2, serving["v1"], timeout_s=300)
        assert res.replicas[0]["last_swap"]["mode"] == "fresh"
        rec1 = golden.load_golden(_storage(base), serving["v1"].fingerprint, base.serving.engine)
        assert rec1 is not None
        assert _served_golden(serving["url"] + "/tp2") == rec1.outputs
    finally:
        serve.delete("rl-serving-tp2")


# -- in-place upgrades (last: they change the served version) ---------------------
class _Load:
    """Clients sending chat requests continuously (plain and streaming) from threads."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.results: list[tuple[float, int, str | None, str]] = []  # (t, status, version, error)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(timeout=120) as c:
            n = 0
            while not self._stop.is_set():
                n += 1
                body = {
                    "model": "demo",
                    "messages": [{"role": "user", "content": f"Who rules country {n}?"}],
                    "max_tokens": 8,
                }
                try:
                    if (i + n) % 2:
                        r = c.post(self.url + "/v1/chat/completions", json=body, headers=headers)
                        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                        err = "" if ok else r.text[:200]
                    else:
                        with c.stream(
                            "POST", self.url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers
                        ) as r:
                            text = r.read().decode()
                        ok = r.status_code == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text
                        err = "" if ok else text[:200]
                    self.results.append(
                        (
                            time.monotonic(),
                            r.status_code if ok else -r.status_code,
                            r.headers.get("x-rayloop-model-version"),
                            err,
                        )
                    )
                except Exception as e:
                    self.results.append((time.monotonic(), -1, None, repr(e)))
                time.sleep(0.05)  # leave the 2 cores to the engines: this is a liveness probe, not a benchmark

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1.0)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def _served_golden(url: str) -> list[str]:
    client = _client(url)
    outs = []
    for p in golden.PROMPTS:
        r = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": p}], max_tokens=golden.MAX_TOKENS, temperature=0
        )
        outs.append(r.choices[0].message.content or "")
    return outs


def _upgrade_under_load(serving: dict[str, Any], cfg: Any, *, record_golden: bool = True) -> tuple[_Load, Any, float]:
    with _Load(serving["url"]) as load:
        t0 = time.monotonic()
        result = deploy(serving["settings"], cfg, timeout_s=400, record_golden=record_golden)
        done = time.monotonic()
    failures = [r for r in load.results if r[1] != 200]
    assert not failures, failures[:5]
    assert len(load.results) >= 10
    print(f"upgrade to v{cfg.version}: {done - t0:.1f}s, {len(load.results)} requests, 0 failed")
    return load, result, done


def test_in_place_upgrade_under_load(serving: dict[str, Any]) -> None:
    settings, url = serving["settings"], serving["url"]
    v2_dir = make_variant(serving["base"], serving["tmp"] / "v2", seed=1, scale=0.5)
    v2 = model_config_for_path("demo", v2_dir, 2)
    load, result, done = _upgrade_under_load(serving, v2)

    assert result.upgraded_from == 1 and {r["version"] for r in result.replicas} == {2}
    for rep in result.replicas:
        assert rep["last_swap"]["mode"] == "in_place", rep
        assert rep["last_swap"]["golden_ok"] is True
    versions = [v for _, _, v, _ in load.results]
    assert versions[0] == "1" and set(versions) == {"1", "2"}
    assert all(v == "2" for t, _, v, _ in load.results if t > done)

    # Outputs now equal those of a fresh v2 engine (recorded by deploy), and differ from v1's.
    rec2 = golden.load_golden(_storage(settings), v2.fingerprint, settings.serving.engine)
    rec1 = golden.load_golden(_storage(settings), serving["v1"].fingerprint, settings.serving.engine)
    assert rec2 is not None and rec1 is not None
    assert rec2.outputs != rec1.outputs
    assert _served_golden(url) == rec2.outputs

    _flush(url)
    versions_captured = set(read_interactions(_storage(settings)).column("model_version").to_pylist())
    assert versions_captured == {1, 2}


def test_tied_embeddings_rebuild_then_in_place(serving: dict[str, Any]) -> None:
    settings, url = serving["settings"], serving["url"]
    t1_dir = make_variant(serving["base"], serving["tmp"] / "t1", seed=2, scale=0.2, tie=True)
    t2_dir = make_variant(serving["base"], serving["tmp"] / "t2", seed=3, scale=0.5, tie=True)
    t1 = model_config_for_path("demo", t1_dir, 3)
    t2 = model_config_for_path("demo", t2_dir, 4)

    # Untied -> tied changes the tensor set: replicas rebuild their engines (one at a time; the unit tests
    # cover the decision, this only needs tied engines loaded, so no load here to keep the test short).
    result = deploy(settings, t1, timeout_s=400, record_golden=False)
    assert {r["version"] for r in result.replicas} == {3}
    assert all(
        r["last_swap"]["mode"] == "rebuild" and "tensor set" in r["last_swap"]["reason"] for r in result.replicas
    )

    # Tied -> tied swaps in place; the packed CPU lm_head must follow the new embedding.
    _, result, _ = _upgrade_under_load(serving, t2)
    assert {r["version"] for r in result.replicas} == {4}
    assert all(r["last_swap"]["mode"] == "in_place" and r["last_swap"]["golden_ok"] for r in result.replicas), (
        result.replicas
    )
    rec = golden.load_golden(_storage(settings), t2.fingerprint, settings.serving.engine)
    assert rec is not None
    assert _served_golden(url) == rec.outputs
