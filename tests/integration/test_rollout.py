"""Rollouts end to end: real Ray Serve, real vLLM CPU engines, continuous load through the openai client.

One router app is shared by the module (engine starts are the cost); the tests
run in order and each starts from the production version the previous left.
Versions: v1 = the demo base model, v2 = a quick fine-tune of it, v3 = the
base weights registered again (a distinct version number).
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
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from rayloop.cli import cli
from rayloop.config import load_settings
from rayloop.monitoring.assets import ALERTS, RULES_FILE, queries
from rayloop.registry import Registry
from rayloop.rollout.controller import deploy, send_command, status
from rayloop.storage import Storage
from tests.integration.console_util import (
    artifacts_dir,
    check_console_during_canary,
    screenshot_prometheus_graphs,
)
from tests.integration.prometheus_util import Prometheus
from tests.integration.rollout_util import Load, active_phase, timeline, wait_for
from tests.integration.serving_util import free_port, make_larger, serve_http_url

APP = "rl-rollout-test"


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@pytest.fixture(scope="module")
def env(
    ray_cluster: dict[str, object], base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    from rayloop.demo.model import finetune
    from rayloop.demo.world import World

    home = tmp_path_factory.mktemp("rollout-home")
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
                    "capture_flush_s": 0.5,
                    "capture_batch_rows": 64,
                    "engine": {"kv_cache_gib": 1, "max_model_len": 256, "max_num_seqs": 16},
                },
                # Released slots keep their engines: each rollout after the first on a slot swaps its version
                # into a running engine (in place, or rebuilt in the replica for another architecture) instead
                # of starting a replica (~70 s under load here). The default (released to idle) is what the
                # demo test runs.
                # The session's cluster exports on this port; Prometheus (started by the `prometheus` fixture
                # from the config rayloop generates) scrapes it every 2 s.
                "ray": {"metrics_export_port": ray._private.worker.global_worker.node.metrics_export_port},
                "monitoring": {"scrape_interval_s": 2, "registry_poll_s": 2},
                "rollout": {
                    "min_requests_per_step": 20,
                    "min_ratings_per_step": 10,
                    "ready_timeout_s": 300,
                    "keep_warm_slots": True,
                },
            }
        )
    )
    settings = load_settings(cfg_file, env={"RAYLOOP_HOME": str(home)})
    reg = Registry.from_settings(settings)
    t0 = time.monotonic()
    reg.register("demo", base_model_dir)
    world = World.build()
    finetune(
        base_model_dir,
        home / "v2",
        [(f.question(0), f.answer()) for f in world.by_split("new")],
        steps=10,
        batch_size=8,
    )
    reg.register("demo", home / "v2", parent=1)
    reg.register("demo", base_model_dir, parent=1)
    for v in (2, 3):  # what `rayloop eval` records; rolling a version out over production needs it
        reg.annotate(f"demo@{v}", "gate", {"decision": "accepted", "reasons": []})
    print(f"fine-tuned and registered 3 versions in {time.monotonic() - t0:.1f}s")
    t0 = time.monotonic()
    first = deploy(settings, "demo@1", "canary")
    print(f"first deploy took {time.monotonic() - t0:.1f}s")
    try:
        yield {
            "settings": settings,
            "config": cfg_file,
            "home": home,
            "reg": reg,
            "first": first,
            "base": base_model_dir,
            "url": serve_http_url(),
            "gcs": ray_cluster.get("gcs_address") or ray_cluster["address"],
        }
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def prometheus(env: dict[str, Any]) -> Iterator[Prometheus]:
    """Prometheus with the scrape config and alert rules ``rayloop up`` writes (here for the test's cluster)."""
    from rayloop.cluster import write_prometheus_config

    config = write_prometheus_config(env["settings"])
    rules = config.parent / RULES_FILE
    for args in (["check", "config", str(config)], ["check", "rules", str(rules)]):
        checked = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    with Prometheus(config, env["home"] / "prometheus-data") as prom:
        wait_for(prom.targets_up, timeout=60, what="Prometheus scraping the cluster", every=1.0)
        yield prom


CONSOLE_KEY = "console-test-key"


@pytest.fixture(scope="module")
def console(env: dict[str, Any]) -> str:
    """The web console, deployed as a user does (`rayloop console` with a key in RAYLOOP_API_KEYS)."""
    r = CliRunner().invoke(
        cli, ["--config", str(env["config"]), "console", "--json"], env={"RAYLOOP_API_KEYS": CONSOLE_KEY}
    )
    assert r.exit_code == 0, r.output
    url: str = json.loads(r.stdout)["url"]
    assert url.endswith("/console/")
    return url


def _dashboard_gaps(prom: Prometheus, start: float) -> dict[str, list[Any]]:
    """What the dashboard's queries lack over ``[start, now]``: panels with no data, series without the labels
    their panel shows, and per-version panels that do not show stable v1 and canary v2 apart."""
    end = time.time()
    gaps: dict[str, list[Any]] = {"empty": [], "unlabelled": [], "merged": []}
    for title, q in queries():
        expr = q.expr.replace("$model", "demo").replace("$__rate_interval", "1m")
        series = prom.query_range(expr, start, end)
        if q.needs is not None:
            continue  # (valid PromQL, the call above says; no data without that event: unit-tested instead)
        if not series:
            gaps["empty"].append((title, expr))
            continue
        gaps["unlabelled"] += [(title, s["metric"]) for s in series if not set(q.labels) <= set(s["metric"])]
        if {"version", "slot"} <= set(q.labels) and "finished_reason" not in q.labels:
            seen = {(s["metric"]["version"], s["metric"]["slot"]) for s in series}
            if not {("1", "stable"), ("2", "canary")} <= seen:
                gaps["merged"].append((title, expr, seen))
    return gaps


def _dashboard_and_alerts_see_stable_and_canary(prom: Prometheus, start: float) -> None:
    """Every query of the Grafana dashboard, and each alert rule's query without its threshold, returns series
    with the labels the panel shows; the per-version panels show stable v1 and canary v2 apart.

    A replica's metrics reach Prometheus an export interval and a scrape after they were recorded: a canary
    judged within seconds of its first request may not be there yet when the rollout ends, so the panels are
    waited for (a panel that never gets its series still fails)."""
    gaps: dict[str, list[Any]] = {}

    def complete() -> bool:
        gaps.update(_dashboard_gaps(prom, start))
        return not any(gaps.values())

    try:
        wait_for(complete, timeout=60, what="every dashboard panel's series", every=2.0)
    except AssertionError:
        assert not gaps["empty"], f"dashboard queries with no data: {gaps['empty']}"
        assert not gaps["unlabelled"], gaps["unlabelled"][:5]
        assert not gaps["merged"], gaps["merged"]
    for alert in ALERTS:
        result = prom.query(alert.query)
        assert result, f"{alert.name}: {alert.query} returned nothing"
        assert all(set(alert.labels) <= set(s["metric"]) for s in result), (alert.name, result)


def _slot_info(slot: str) -> dict[str, Any]:
    from ray import serve

    from rayloop.serving.app import slot_deployment_name

    info: dict[str, Any] = (
        serve.get_deployment_handle(slot_deployment_name(slot), APP).info.remote().result(timeout_s=30)
    )
    return info


def _full_load_on(load: Load, event: str) -> Any:
    """An ``on_event`` that sets every client of ``load`` sending once the rollout emits ``event``."""

    def on_event(e: dict[str, Any]) -> None:
        if e["event"] == event:
            load.resize(load.threads)

    return on_event


def _no_failures(load: Load) -> None:
    bad = load.failures()
    assert not bad, f"{len(bad)} of {len(load.samples)} requests failed, e.g. {bad[:3]}"


def test_first_deploy_serves_v1_through_the_router(env: dict[str, Any]) -> None:
    first = env["first"]
    assert first.status == "succeeded" and first.from_version is None and first.to_version == 1
    st = status(env["settings"], "demo")
    assert st["serve"]["slots"] == {"stable": 1, "canary": None, "shadow": None}
    assert st["models"]["demo"]["aliases"] == {"production": 1}
    r = httpx.post(
        env["url"] + "/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-rayloop-model-version"] == "1" and r.json()["model"] == "demo@v1"


def test_canary_with_worse_feedback_is_rolled_back_automatically(env: dict[str, Any], prometheus: Prometheus) -> None:
    reg: Registry = env["reg"]
    watched_from = time.time()
    # Users dislike every v2 answer and like every v1 answer.
    with Load(env["url"], threads=3, sticky_threads=1, rate=lambda v: -1 if v == 2 else 1) as load:
        time.sleep(2)
        load.resize(1)  # one client while the canary's engine starts (it shares the two cores), all three after
        # A 10 s step: the verdict waits for min_requests/min_ratings (20/10) on the canary anyway.
        rec = deploy(
            env["settings"],
            "demo@2",
            "canary",
            steps=[20, 50, 100],
            interval_s=10,
            on_event=_full_load_on(load, "step"),
        )
        time.sleep(3)
    print(timeline(rec))
    assert rec.status == "rolled_back", rec.state
    breach = next(e for e in rec.history if e["event"] == "breach")
    assert breach["canary"]["mean_rating"] == -1.0 and breach["stable"]["mean_rating"] == 1.0
    assert "mean rating -1.00 on canary vs +1.00 on stable" in rec.state.reason
    _no_failures(load)
    # Feedback sent right after its answer finds the interaction (no capture-side race).
    assert load.feedback_sent > 0 and not load.feedback_failures, load.feedback_failures[:3]
    ended = _ts(rec.ended_at)
    assert {s.version for s in load.samples if s.sent > ended} == {1}
    assert {s.version for s in load.samples} == {1, 2}  # the canary did serve before it was judged
    assert reg.aliases("demo") == {"production": 1}
    assert status(env["settings"], "demo")["serve"]["slots"] == {"stable": 1, "canary": None, "shadow": None}

    # Seen from Prometheus: the rollback alert fires (from the registry, through the serving replicas'
    # metrics), and the dashboard has every panel's data, with the two versions apart.
    def rollback_alert_fires() -> bool:
        return any(
            a["labels"].get("alertname") == "RayloopRollbackHappened"
            and a["labels"].get("model") == "demo"
            and a["state"] == "firing"
            for a in prometheus.alerts()
        )

    wait_for(rollback_alert_fires, timeout=120, what="the RayloopRollbackHappened alert to fire", every=1.0)
    # (other test modules' apps on this session cluster serve a "demo" too, from registries of their own: this
    # app's series are told apart by Serve's `application` label)
    ours = f'model="demo",application="{APP}"'

    def our_rollback_is_recent() -> bool:
        age = prometheus.query(f"time() - max(ray_rayloop_rollout_last_rollback_timestamp_seconds{{{ours}}})")
        return bool(age) and float(age[0]["value"][1]) < 900

    wait_for(our_rollback_is_recent, timeout=60, what="this app's rollback time on Prometheus", every=1.0)
    _dashboard_and_alerts_see_stable_and_canary(prometheus, watched_from)
    reasons = prometheus.query(f"max by (reason) (ray_rayloop_rollbacks_total{{{ours}}})")
    assert {s["metric"]["reason"] for s in reasons} == {"analysis_failed"}, reasons
    # A picture of the dashboard's traffic and feedback panels (Grafana itself is not packaged here).
    picked = {"Traffic weight by version", "Feedback by version"}
    exprs = [q.expr.replace("$model", "demo").replace("$__rate_interval", "1m") for t, q in queries() if t in picked]
    screenshot_prometheus_graphs(
        prometheus.url, exprs, artifacts_dir() / "dashboard-canary-rollback.png", int(time.time() - watched_from)
    )


def test_slow_canary_is_rolled_back_automatically(env: dict[str, Any]) -> None:
    """A candidate ~20x the size of production (random weights): it answers, only much more slowly."""
    reg: Registry = env["reg"]
    slow = make_larger(env["base"], env["home"] / "slow", hidden=512, layers=6, intermediate=1408)
    version = reg.register("demo", slow, parent=1).version
    reg.annotate(f"demo@{version}", "gate", {"decision": "accepted", "reasons": []})  # slow, not wrong
    # 16 output tokens per request, so the per-token cost shows in the latency, not only the fixed costs; and
    # the ratio alone judges: the default +50 ms jitter floor is more than the slow model adds on a fast CPU
    # (this VM on a fast day: the slow canary passed every step with it).
    rollout = env["settings"].rollout.model_copy(update={"latency_slack_ms": 5.0})
    settings = env["settings"].model_copy(update={"rollout": rollout})
    with Load(env["url"], threads=3, sticky_threads=1, max_tokens=16) as load:
        time.sleep(2)
        rec = deploy(settings, f"demo@{version}", "canary", steps=[20, 50, 100], interval_s=10)
        time.sleep(3)
    print(timeline(rec))
    assert rec.status == "rolled_back", rec.state
    breach = next(e for e in rec.history if e["event"] == "breach")
    canary, stable = breach["canary"], breach["stable"]
    assert canary["p95_ms"] > 1.5 * stable["p95_ms"], breach
    assert any("p95 latency" in r for r in breach["reasons"]) and "p95 latency" in rec.state.reason, breach
    # Caught at a step, never promoted: usually the first, but on a loaded machine the slow canary's p95 can
    # stay just under 1.5x stable's there (CI once saw 856 vs 603 ms at 20%, then 808 vs 437 ms at 50%).
    steps = [e["percent"] for e in rec.history if e["event"] == "step"]
    promoted = [e for e in rec.history if e["event"] == "promote"]
    assert steps and steps == [20, 50, 100][: len(steps)] and not promoted, rec.history
    # The canary slot's engine, kept warm since the last rollout, was rebuilt in its replica for the other
    # architecture (no in-place swap across shapes).
    canary_slot = _slot_info("canary")
    assert canary_slot["last_swap"]["mode"] == "rebuild" and canary_slot["last_swap"]["version"] == version
    _no_failures(load)  # slow, not broken: every user still got an answer
    ended = _ts(rec.ended_at)
    assert {s.version for s in load.samples if s.sent > ended} == {1}
    assert version in {s.version for s in load.samples}  # the canary did serve before it was judged
    assert reg.aliases("demo") == {"production": 1}
    assert status(env["settings"], "demo")["serve"]["slots"] == {"stable": 1, "canary": None, "shadow": None}


def test_canary_steps_shares_sticky_sessions_and_promotion(env: dict[str, Any], console: str) -> None:
    reg: Registry = env["reg"]
    events: list[dict[str, Any]] = []
    # During the 25% step an operator opens the web console in a browser (its own thread: the step goes on).
    browsed: dict[str, Any] = {}

    def browse() -> None:
        try:
            browsed.update(
                check_console_during_canary(
                    console, CONSOLE_KEY, "demo", lambda: status(env["settings"], "demo"), artifacts_dir()
                )
            )
        except BaseException as e:  # reported after the rollout
            browsed["error"] = e

    browser = threading.Thread(target=browse, name="console-browser")
    # A step is judged only once the canary has answered enough requests: at 25% that is >= 1400 requests
    # in all, so the measured share rests on >= 1000 one-request sessions whatever the load manages. At
    # 100% there is no share to estimate: every fresh session must be on v2.
    rollout = env["settings"].rollout.model_copy(update={"min_samples": 350, "max_step_wait_factor": 30})
    settings = env["settings"].model_copy(update={"rollout": rollout})
    with Load(env["url"], threads=6, sticky_threads=1, fixed_sessions=30) as load:
        time.sleep(4)
        print(f"load: {load.rps():.1f} req/s")
        load.resize(2)  # light load while the canary engine starts (it shares the two cores)

        def on_event(e: dict[str, Any]) -> None:
            events.append(e)
            if e["event"] == "step":
                load.resize(6)
                if e.get("percent") == 25:
                    browser.start()

        rec = deploy(settings, "demo@2", "canary", steps=[25, 100], interval_s=50, on_event=on_event)
        time.sleep(3)
    browser.join(timeout=300)
    print(timeline(rec))
    assert rec.status == "succeeded", rec.state
    if "error" in browsed:
        raise browsed["error"]
    # The console showed the 25% step as Serve applied it, while it lasted.
    assert browsed["weights"] == [("canary", 2, 25.0), ("stable", 1, 75.0)], browsed
    step_ends = [e["time"] for e in events if e["event"] == "step_passed"]
    assert step_ends and browsed["at"] < step_ends[0], "the pages were checked during the 25% step"
    _no_failures(load)
    starts = [e for e in events if e["event"] == "step"]
    ends = [e for e in events if e["event"] == "step_passed"]
    assert [e["percent"] for e in starts] == [25, 100] and [e["percent"] for e in ends] == [25, 100]
    for start, end in zip(starts, ends, strict=True):
        fresh = load.between(start["time"] + 0.5, end["time"], sticky=False)
        share = 100.0 * sum(s.version == 2 for s in fresh) / len(fresh)
        print(f"step {start['percent']}%: {len(fresh)} sessions, {share:.1f}% on v2")
        assert end["canary"]["requests"] >= 350 and end["decision"] == "pass"
        if start["percent"] < 100:
            # >= 1000 one-request sessions: the share's standard error is at most 1.4 points.
            assert len(fresh) >= 1000
            assert abs(share - start["percent"]) <= 5
        else:
            assert len(fresh) >= 100 and share == 100.0
    # A sticky session moves from v1 to v2 at most once and never back.
    paths = load.session_paths()
    assert len(paths) == 30
    assert all(p in ([1], [2], [1, 2]) for p in paths.values()), {
        k: p for k, p in paths.items() if p not in ([1], [2], [1, 2])
    }
    assert {s.version for s in load.samples if s.sent > _ts(rec.ended_at)} == {2}
    assert reg.aliases("demo") == {"production": 2, "previous": 1}
    assert status(env["settings"], "demo")["serve"]["slots"] == {"stable": 2, "canary": None, "shadow": None}


def test_blue_green_switch_and_rollback(env: dict[str, Any]) -> None:
    reg: Registry = env["reg"]
    events: list[dict[str, Any]] = []
    out: dict[str, Any] = {}

    def run() -> None:
        out["rec"] = deploy(env["settings"], "demo@3", "blue-green", hold_s=300, on_event=events.append)

    with Load(env["url"], threads=2, sticky_threads=1) as load:
        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: any(e["event"] == "switch" for e in events), 300, "the blue-green switch")
        switched = next(e for e in events if e["event"] == "switch")["time"]
        assert reg.get_alias("demo", "production") == 3
        time.sleep(4)
        t_rollback = time.time()
        rec = send_command(env["settings"], "demo", "rollback", by="test", wait_s=120)
        t_done = time.time()
        t.join(60)
        time.sleep(2)
    print(timeline(rec))
    assert rec.status == "rolled_back" and out["rec"].status == "rolled_back"
    print(f"rollback took {t_done - t_rollback:.2f}s")
    # Green was the canary slot's warm engine (kept from the previous rollout): v3 was swapped into it in
    # place; released again, it keeps v3 loaded for the next rollout.
    green = _slot_info("canary")
    assert green["last_swap"]["mode"] == "in_place" and green["last_swap"]["version"] == 3, green
    assert green["parked"] is True and status(env["settings"], "demo")["serve"]["warm"] == {"canary": 3}
    _no_failures(load)
    on_green = load.between(switched + 0.5, t_rollback)
    assert on_green and {s.version for s in on_green} == {3}
    assert {s.version for s in load.samples if s.sent > t_done} == {2}
    assert reg.get_alias("demo", "production") == 2
    assert status(env["settings"], "demo")["serve"]["slots"] == {"stable": 2, "canary": None, "shadow": None}


def test_shadow_mirrors_without_changing_answers(env: dict[str, Any]) -> None:
    import pyarrow.dataset as ds

    with Load(env["url"], threads=2, sticky_threads=0) as load:
        time.sleep(1)
        load.resize(1)  # one client while the shadow slot's engine starts, both while it mirrors
        rec = deploy(env["settings"], "demo@3", "shadow", interval_s=8, on_event=_full_load_on(load, "slot_ready"))
        time.sleep(1)
    print(timeline(rec))
    assert rec.status == "succeeded"
    _no_failures(load)
    assert {s.version for s in load.samples} == {2}  # users only ever saw production
    report = rec.state.report
    assert report["pairs"] > 0 and report["shadow_versions"] == [3] and report["errors"] == 0
    assert env["reg"].get_alias("demo", "production") == 2
    assert env["reg"].resolve("demo@3").annotations["shadow"]["pairs"] == report["pairs"]
    httpx.post(env["url"] + "/rayloop/flush", timeout=60)
    storage = Storage(env["settings"].storage_root)
    rows = (
        ds.dataset(storage.path("shadow"), filesystem=storage.fs, format="parquet", partitioning="hive")
        .to_table()
        .to_pylist()
    )
    ids = {s.request_id for s in load.samples}
    mine = [r for r in rows if r["request_id"] in ids]
    assert len(mine) >= report["pairs"] * 0.9
    for r in mine:
        assert (r["primary_version"], r["shadow_version"], r["shadow_status"]) == (2, 3, "ok")
        assert r["exact_match"] == (r["primary_completion"] == r["shadow_completion"])
        assert 0.0 <= r["similarity"] <= 1.0 and r["shadow_latency_ms"] > 0
    assert status(env["settings"], "demo")["serve"]["slots"] == {"stable": 2, "canary": None, "shadow": None}


def test_killed_controller_is_reconciled(env: dict[str, Any]) -> None:
    reg: Registry = env["reg"]
    log = env["home"] / "controller.log"
    proc_env = {**os.environ, "RAY_ADDRESS": str(env["gcs"]), "RAYLOOP_HOME": str(env["home"])}
    cmd = [sys.executable, "-m", "rayloop.cli", "--config", str(env["config"]), "deploy", "demo@3"]
    cmd += ["--strategy", "canary", "--steps", "10,100", "--interval", "600s"]
    with Load(env["url"], threads=2, sticky_threads=0) as load, log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=proc_env)
        try:
            wait_for(
                lambda: active_phase(reg) == "step" or proc.poll() is not None,
                300,
                "the controller to reach its first canary step",
            )
            assert proc.poll() is None, log.read_text()[-2000:]
            _pinned_requests_reach_their_version(env["url"], stable=2, canary=3)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        active = reg.active_rollout("demo")
        assert active is not None and active.state.phase == "step"
        assert status(env["settings"], "demo")["models"]["demo"]["active_rollout"]["owner_alive"] is False
        r = CliRunner().invoke(cli, ["--config", str(env["config"]), "status", "--reconcile", "--json"])
        t_done = time.time()
        time.sleep(2)
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["reconciled"]["demo"]["action"] == "rolled_back"
    assert st["serve"]["slots"] == {"stable": 2, "canary": None, "shadow": None} and st["serve"]["canary_percent"] == 0
    _no_failures(load)
    assert {s.version for s in load.samples} == {2, 3}
    assert {s.version for s in load.samples if s.sent > t_done} == {2}
    assert reg.active_rollout("demo") is None and reg.aliases("demo") == {"production": 2, "previous": 1}
    ended = reg.rollouts("demo")[0]
    assert ended.status == "rolled_back" and "is gone (phase step)" in ended.state.reason


def _pinned_requests_reach_their_version(url: str, *, stable: int, canary: int) -> None:
    """During a 10% canary step, ``model: demo@REF`` answers from REF's version every time; /v1/models lists
    both versions; a registered version that is not served is a 404 naming what is."""

    def ask(model: str) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)

    for model, version in (
        (f"demo@{canary}", canary),
        (f"demo@v{stable}", stable),
        ("demo@production", stable),
    ):
        answers = [ask(model) for _ in range(4)]
        assert [(r.status_code, r.json()["model"]) for r in answers] == [(200, f"demo@v{version}")] * 4, model
    assert {m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]} >= {
        f"demo@v{stable}",
        f"demo@v{canary}",
    }
    missing = ask("demo@previous")  # v1: registered, not served
    assert missing.status_code == 404, missing.text
    assert missing.json()["error"]["message"] == (
        f"The model `demo@previous` (version 1) is not served here; served now: demo@v{stable}, demo@v{canary}"
    )


def test_rolling_upgrade_in_place_under_load(env: dict[str, Any]) -> None:
    with Load(env["url"], threads=2, sticky_threads=0) as load:
        time.sleep(1)
        rec = deploy(env["settings"], "demo@3", "rolling", interval_s=3)
        time.sleep(2)
    print(timeline(rec))
    assert rec.status == "succeeded", rec.state
    _no_failures(load)
    assert {s.version for s in load.samples if s.sent > _ts(rec.ended_at)} == {3}
    assert env["reg"].aliases("demo") == {"production": 3, "previous": 2}
