"""Fault injection on the real stack: what fails must fail closed, and no answered request's row is lost.

One lean app (real Ray Serve, real vLLM CPU engines) is shared by the module; the tests run in order:
hand-picked bad bodies and a property-based fuzz of the HTTP API (no 5xx, the replica alive after),
the capture writer killed under load, storage that refuses writes for 10 s, a canary that sees no
traffic, the stats actor killed in the middle of a canary step, and a controller paused past its lease
while another takes over. Each one counts: rows written == answered requests, nothing promoted, no
request failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rayloop.config import load_settings
from rayloop.data.capture import NAMESPACE, read_interactions, writer_name, writer_stats
from rayloop.registry import Registry
from rayloop.rollout.controller import deploy
from tests.integration.rollout_util import Load, active_phase, timeline, wait_for
from tests.integration.serving_util import free_port, serve_http_url

APP = "rl-faults-test"
FUZZ_CASES = 150


@pytest.fixture(scope="module")
def env(
    ray_cluster: dict[str, object], base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    from ray import serve

    home = tmp_path_factory.mktemp("faults-home")
    cfg_file = home / "rayloop.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "home": str(home),
                "serving": {
                    "app_name": APP,
                    "http_port": free_port(),
                    "replicas": 1,
                    "replica_num_cpus": 0.5,
                    # Rows stay in the writer's memory between explicit flushes: a killed writer has some.
                    "capture_flush_s": 60,
                    "capture_batch_rows": 10_000,
                    "capture_write_attempts": 2,
                    "capture_retry_base_s": 0.2,
                    "max_body_bytes": 256 * 1024,
                    "engine": {"kv_cache_gib": 1, "max_model_len": 256, "max_num_seqs": 16},
                },
                "rollout": {
                    "min_requests_per_step": 20,
                    "ready_timeout_s": 300,
                    "keep_warm_slots": True,
                },
            }
        )
    )
    settings = load_settings(cfg_file, env={"RAYLOOP_HOME": str(home)})
    reg = Registry.from_settings(settings)
    reg.register("demo", base_model_dir)
    reg.register("demo", base_model_dir, parent=1)  # v2: the same weights, another version
    reg.annotate("demo@2", "gate", {"decision": "accepted", "reasons": []})
    deploy(settings, "demo@1", "canary")
    try:
        yield {
            "settings": settings,
            "reg": reg,
            "url": serve_http_url(),
            "home": home,
            "config": cfg_file,
            "gcs": ray_cluster.get("gcs_address") or ray_cluster["address"],
        }
    finally:
        serve.delete(APP)


def _flush(url: str) -> None:
    r = httpx.post(url + "/rayloop/flush", timeout=120)
    assert r.status_code == 200, r.text


def _alive(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.choices[0].message.content is not None


def _captured_ids(env: dict[str, Any]) -> set[str]:
    _flush(env["url"])
    rows = read_interactions(env["settings"].storage_root)
    return set(rows.column("request_id").to_pylist())


def _answered(load: Load) -> set[str]:
    return {s.request_id for s in load.samples if s.status == 200 and s.request_id}


# -- bad input --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "what"),
    [
        (b'{"model": "demo", "messages": []' + b" " * (300 * 1024) + b"}", 413, "over serving.max_body_bytes"),
        (b"[" * 5000 + b"]" * 5000, 400, "nested past 100 levels"),
        (b'{"model": "demo", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid UTF-8"),
        (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 400, "lone surrogate"),
        (b'{"model": "demo", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, "lone surrogate"),
        (b"", 400, "empty body"),
        (b"null", 400, "not an object"),
    ],
)
def test_bad_bodies_get_openai_shaped_4xx(env: dict[str, Any], body: bytes, status: int, what: str) -> None:
    r = httpx.post(
        env["url"] + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == status, (what, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"], err


def test_bad_requests_through_the_openai_client(env: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=env["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=msgs, max_tokens=-1)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages="hi")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt="word " * 400, max_tokens=4)
    _alive(env["url"])


# -- property-based fuzz ------------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_model = st.sampled_from(["demo", "demo@v1", "demo@1", "demo@production", "demo@nope", "other", ""]) | _json
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "nobody"]) | _json},
    optional={"content": st.text(max_size=60) | _json, "name": st.text(max_size=10)},
)
_sampling = {
    "max_tokens": st.integers(-3, 24) | st.sampled_from([0, 255, 256, 10**9]) | _json,
    "temperature": st.floats(-1, 3, allow_nan=False) | _json,
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "n": st.integers(-1, 3),
    "stream": st.booleans(),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
    "seed": st.integers(-(2**63), 2**63),
    "user": st.text(max_size=20),
    "logprobs": st.booleans() | st.integers(-1, 30),
    "presence_penalty": st.floats(-3, 3, allow_nan=False),
    "extra_field": _json,
}
_chat = st.fixed_dictionaries(
    {"model": _model}, optional={"messages": st.lists(_message, max_size=3) | _json, **_sampling}
)
_completion = st.fixed_dictionaries(
    {"model": _model},
    optional={
        "prompt": st.text(max_size=60)
        | st.lists(st.text(max_size=20), max_size=3)
        | st.lists(st.integers(), max_size=5),
        **_sampling,
    },
)
_feedback = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.text(max_size=40) | _json,
        "rating": st.integers(-3, 3) | _json,
        "correction": st.text(max_size=40) | _json,
    },
)
# Valid requests with valid options: the engine answers them (200), so the fuzz covers the success path too.
_valid_options = {
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "n": st.integers(1, 2),
    "stream": st.booleans(),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "seed": st.integers(0, 2**31),
    "user": st.text(max_size=20),
}
_valid_model = st.sampled_from(["demo", "demo@v1", "demo@1", "demo@production"])
_valid_chat = st.fixed_dictionaries(
    {
        "model": _valid_model,
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(min_size=1, max_size=60)}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional=_valid_options,
)
_valid_completion = st.fixed_dictionaries(
    {"model": _valid_model, "prompt": st.text(min_size=1, max_size=60)}, optional=_valid_options
)
_case = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), _valid_chat),
    st.tuples(st.just("/v1/completions"), _valid_completion),
    st.tuples(st.just("/v1/chat/completions"), _chat),
    st.tuples(st.just("/v1/completions"), _completion),
    st.tuples(st.just("/v1/feedback"), _feedback),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/feedback"]), st.binary(max_size=64)),
)


def test_fuzzed_requests_never_get_a_5xx_and_the_replica_lives(env: dict[str, Any]) -> None:
    url = env["url"]
    http = httpx.Client(timeout=120)
    tried: list[int] = []

    @hsettings(
        max_examples=FUZZ_CASES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=_case)
    def one(case: tuple[str, Any]) -> None:
        path, body = case
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        with http.stream("POST", url + path, content=content, headers={"Content-Type": "application/json"}) as r:
            text = r.read().decode("utf-8", "replace")
        tried.append(r.status_code)
        assert r.status_code < 500, (path, content[:300], r.status_code, text[:300])
        if r.status_code >= 400:
            assert json.loads(text)["error"]["code"] == r.status_code, text[:300]

    one()
    statuses = {s: tried.count(s) for s in sorted(set(tried))}
    print(f"fuzz: {len(tried)} generated requests, statuses {statuses}")
    assert len(tried) >= FUZZ_CASES and 200 in statuses  # some were valid, and answered
    _alive(url)
    health = httpx.get(url + "/healthz", timeout=30).json()
    assert health["status"] == "ok"


# -- capture under faults -------------------------------------------------------------
def test_a_capture_writer_killed_under_load_loses_no_answered_request(env: dict[str, Any]) -> None:
    import ray

    settings = env["settings"]
    writer = ray.get_actor(writer_name(settings.storage_root), namespace=NAMESPACE)
    with Load(env["url"], threads=3, sticky_threads=0) as load:
        wait_for(lambda: len(_answered(load)) >= 30, 120, "30 answered requests")
        ray.kill(writer, no_restart=False)  # a crash: Ray restarts it (max_restarts), its memory is gone
        killed_at = len(load.samples)
        wait_for(lambda: len(load.samples) >= killed_at + 30, 120, "30 more requests after the kill")
    assert not load.failures(), load.failures()[:3]
    missing = _answered(load) - _captured_ids(env)
    assert not missing, f"{len(missing)} answered requests have no captured row, e.g. {sorted(missing)[:3]}"
    stats = writer_stats(settings)
    assert stats is not None and sum(stats["recovered"].values()) > 0, stats  # what the killed writer held
    assert not any(stats["dropped"].values()), stats


def test_storage_that_refuses_writes_for_10s_is_ridden_out(env: dict[str, Any]) -> None:
    settings = env["settings"]
    interactions = Path(settings.storage_root) / "interactions"
    away = interactions.with_name("interactions.away")
    before = writer_stats(settings) or {}
    with Load(env["url"], threads=2, sticky_threads=0) as load:
        wait_for(lambda: len(_answered(load)) >= 10, 120, "10 answered requests")
        _flush(env["url"])
        # The storage fails: every write under interactions/ fails (a file stands where the directory was).
        interactions.rename(away)
        interactions.write_text("storage is down")
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10:
                _flush(env["url"])  # writes fail, are retried, then spilled to the journal
                time.sleep(1)
            down = writer_stats(settings)
            assert down is not None and down["storage_down"], down
        finally:
            interactions.unlink()
            away.rename(interactions)
        answered_in_outage = len(_answered(load))
        wait_for(lambda: len(_answered(load)) >= answered_in_outage + 10, 120, "10 requests after the outage")
    assert not load.failures(), load.failures()[:3]
    missing = _answered(load) - _captured_ids(env)
    assert not missing, f"{len(missing)} answered requests have no captured row, e.g. {sorted(missing)[:3]}"
    after = writer_stats(settings)
    assert after is not None and not after["storage_down"], after

    def grew(key: str) -> int:
        return after[key].get("interactions", 0) - before.get(key, {}).get("interactions", 0)

    assert grew("spilled") > 0 and grew("replayed") >= grew("spilled"), (before, after)
    assert after["journal"]["entries"] == 0 and not any(after["dropped"].values()), after
    assert not list(Path(settings.storage_root).rglob(".tmp-*"))  # no half-written file left behind


# -- rollouts under faults ------------------------------------------------------------
def test_a_canary_that_sees_no_traffic_is_rolled_back(env: dict[str, Any]) -> None:
    rollout = env["settings"].rollout.model_copy(update={"progress_deadline_s": 6.0})
    settings = env["settings"].model_copy(update={"rollout": rollout})
    rec = deploy(settings, "demo@2", "canary", steps=[50, 100], interval_s=2)
    print(timeline(rec))
    assert rec.status == "rolled_back", rec.state
    assert "inconclusive" in rec.state.reason, rec.state
    assert [e["percent"] for e in rec.history if e["event"] == "step"] == [50]
    assert env["reg"].get_alias("demo", "production") == 1


def test_a_stats_actor_killed_mid_canary_rolls_it_back(env: dict[str, Any]) -> None:
    import ray

    from rayloop.serving.stats import stats_actor_name

    settings = env["settings"]
    killed = threading.Event()

    def kill() -> None:
        ray.kill(ray.get_actor(stats_actor_name(APP, settings.storage_root), namespace=NAMESPACE))
        killed.set()

    def kill_at_first_step(e: dict[str, Any]) -> None:
        if e["event"] == "step" and e["percent"] == 50:
            # 3 s into the 8 s step: the ingress brings a fresh, empty actor back within a second
            threading.Timer(3.0, kill).start()

    with Load(env["url"], threads=3, sticky_threads=0) as load:
        wait_for(lambda: len(_answered(load)) >= 10, 120, "10 answered requests")
        rec = deploy(settings, "demo@2", "canary", steps=[50, 100], interval_s=8, on_event=kill_at_first_step)
    print(timeline(rec))
    assert killed.is_set()
    assert rec.status == "rolled_back", rec.state
    assert "StatsLost" in rec.state.reason, rec.state
    assert [e["percent"] for e in rec.history if e["event"] == "step"] == [50]
    assert env["reg"].get_alias("demo", "production") == 1
    assert not load.failures(), load.failures()[:3]  # the users saw none of it
    assert {s.version for s in load.samples} == {1, 2}  # the canary did serve before it was judged


def test_a_controller_paused_past_its_lease_is_taken_over_and_then_writes_nothing(env: dict[str, Any]) -> None:
    """Controller A (a `rayloop deploy` process) stops mid-canary (SIGSTOP: a long GC, a frozen VM); once its
    lease expired, B takes the rollout over and rolls it back; A, woken, finds its token stale and stops."""
    from rayloop.rollout.controller import reconcile

    reg: Registry = env["reg"]
    proc_env = {
        **os.environ,
        "RAY_ADDRESS": str(env["gcs"]),
        "RAYLOOP_HOME": str(env["home"]),
        "RAYLOOP_ROLLOUT__LEASE_S": "3",
    }
    # -X faulthandler: a SIGABRT makes A print every thread's stack (used when it does not stop in time).
    cmd = [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "rayloop.cli",
        "--config",
        str(env["config"]),
        "deploy",
        "demo@2",
    ]
    cmd += ["--strategy", "canary", "--steps", "50,100", "--interval", "600s", "--json"]
    with Load(env["url"], threads=2, sticky_threads=0) as load:
        a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=proc_env)
        try:
            wait_for(
                lambda: active_phase(reg) == "step" or a.poll() is not None,
                300,
                "controller A to reach its first canary step",
            )
            assert a.poll() is None, a.communicate()[0][-3000:]
            rid = reg.active_rollout("demo").id  # type: ignore[union-attr]
            a.send_signal(signal.SIGSTOP)
            wait_for(lambda: reg.lease(rid).expires_at < time.time(), 60, "A's lease to expire")
            lease = env["settings"].rollout.model_copy(update={"lease_s": 3.0})
            out = reconcile(env["settings"].model_copy(update={"rollout": lease}), "demo")
            assert out.action == "rolled_back" and reg.lease(rid).token == 2, out
            events_after_b = len(reg.rollout(rid).history)
            a.send_signal(signal.SIGCONT)
            try:
                output, _ = a.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                a.send_signal(signal.SIGABRT)
                pytest.fail("A did not stop within 60 s of waking:\n" + a.communicate(timeout=30)[0][-6000:])
        finally:
            if a.poll() is None:
                a.kill()
                a.wait()
    assert a.returncode != 0 and "LeaseLostError" in output, output[-3000:]
    record = reg.rollout(rid)
    assert record.status == "rolled_back" and len(record.history) == events_after_b  # A wrote nothing
    assert reg.get_alias("demo", "production") == 1
    assert not load.failures(), load.failures()[:3]
    from rayloop.rollout.controller import status

    assert status(env["settings"], "demo")["serve"]["slots"]["canary"] is None
