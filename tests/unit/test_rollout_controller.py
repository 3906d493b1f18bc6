"""Controller and strategies against the in-memory fake backend (real registry on SQLite)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rayloop.config import Strategy, load_settings
from rayloop.errors import ConfigError, NotFoundError, RolloutError, RolloutInProgressError
from rayloop.registry import Registry, RolloutState
from rayloop.rollout.backend import idle_state
from rayloop.rollout.controller import (
    PlacementWatch,
    deploy,
    owner_alive,
    parse_duration,
    parse_steps,
    reconcile,
    send_command,
    status,
)
from rayloop.rollout.fake_backend import Behaviour, FakeBackend
from rayloop.serving.protocol import ModelConfig
from rayloop.serving.routing import CANARY, SHADOW, STABLE, RouteTable
from tests.registry_util import make_model_dir

FAST = {"interval_s": 0.3, "hold_s": 0.3}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    settings = load_settings(
        env={"RAYLOOP_HOME": str(tmp_path / "home")},
        overrides={"rollout": {"min_requests_per_step": 20, "min_ratings_per_step": 10}},
    )
    reg = Registry.from_settings(settings)
    v1 = reg.register("demo", make_model_dir(tmp_path / "m1", seed=1))
    v2 = reg.register("demo", make_model_dir(tmp_path / "m2", seed=2))
    reg.set_alias("demo", "production", 1)
    reg.annotate("demo@2", "gate", {"decision": "accepted", "reasons": []})  # the gate vouched for v2
    cfg1 = ModelConfig(model="demo", version=1, fingerprint=v1.fingerprint)
    backend = FakeBackend(state=idle_state("demo", cfg1, RouteTable(versions={STABLE: 1})))
    return {"settings": settings, "reg": reg, "backend": backend, "v1": v1, "v2": v2}


def _events(rec: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in rec.history if e["event"] == name]


def _phase(reg: Registry) -> str | None:
    """The phase of demo's active rollout (None: none is active)."""
    active = reg.active_rollout("demo")
    return None if active is None else active.state.phase


def _final_app(backend: FakeBackend) -> tuple[int | None, int | None, int | None, float]:
    st = backend.state
    assert st is not None
    return st.version(STABLE), st.version(CANARY), st.version(SHADOW), st.table.canary_percent


def test_parse_duration_and_steps() -> None:
    assert [parse_duration(v) for v in ("30s", "2m", "500ms", "1h", "7", 3)] == [30, 120, 0.5, 3600, 7, 3]
    with pytest.raises(ConfigError, match="'soon' is not understood"):
        parse_duration("soon")
    assert parse_steps("5, 25,50,100") == [5, 25, 50, 100]
    with pytest.raises(ConfigError, match="must end at 100"):
        parse_steps("5,25")
    with pytest.raises(ConfigError, match="not comma-separated integers"):
        parse_steps("5,x")


def test_canary_succeeds_step_by_step_and_moves_aliases(env: dict[str, Any]) -> None:
    seen: list[dict[str, Any]] = []
    rec = deploy(
        env["settings"], "demo@2", "canary", steps=[10, 50, 100], **FAST, backend=env["backend"], on_event=seen.append
    )
    assert rec.status == "succeeded" and rec.strategy == "canary"
    steps = _events(rec, "step_passed")
    assert [s["percent"] for s in steps] == [10, 50, 100]
    assert all(s["decision"] == "pass" and s["canary"]["requests"] >= 20 for s in steps)
    # Traffic went 0 -> 10 -> 50 -> 100 -> 0 on the canary slot, stable took v2 while canary held 100%.
    applied = env["backend"].applied
    assert [a.table.canary_percent for a in applied] == [0, 10, 50, 100, 100, 0, 0]
    assert applied[4].version(STABLE) == 2 and applied[4].version(CANARY) == 2
    assert _final_app(env["backend"]) == (2, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 2, "previous": 1}
    assert env["backend"].golden == [2]
    # While Serve starts the canary's replicas, the caller hears how far it got (progress, not history).
    told = [e["event"] for e in seen]
    assert told[:3] == ["plan", "serve", "slot_ready"], told
    assert "'canary': 2" in seen[1]["status"], seen[1]
    recorded = [e["event"] for e in rec.history if e["event"] not in ("begin", "end")]
    assert [e["event"] for e in seen if e["event"] != "serve"] == recorded
    assert all("time" in e for e in rec.history)
    assert env["reg"].active_rollout("demo") is None


def test_canary_with_worse_feedback_rolls_back_automatically(env: dict[str, Any]) -> None:
    env["backend"].behaviours = {1: Behaviour(rating=1), 2: Behaviour(rating=-1)}
    rec = deploy(env["settings"], "demo@2", Strategy.CANARY, steps=[10, 50, 100], **FAST, backend=env["backend"])
    assert rec.status == "rolled_back"
    breach = _events(rec, "breach")[0]
    assert "mean rating -1.00 on canary vs +1.00 on stable" in breach["reasons"][0]
    # Too few ratings at 10% to judge feedback; the breach comes as soon as there are enough.
    assert [s["percent"] for s in _events(rec, "step_passed")] in ([], [10])
    assert _events(rec, "promote") == [] and "mean rating" in rec.state.reason
    assert _final_app(env["backend"]) == (1, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 1}


def test_canary_erroring_rolls_back_at_the_step_it_breaches(env: dict[str, Any]) -> None:
    env["backend"].behaviours = {2: Behaviour(error_rate=0.2)}
    rec = deploy(env["settings"], "demo@2", "canary", steps=[10, 100], **FAST, backend=env["backend"])
    assert rec.status == "rolled_back" and re.match(
        r"error rate (1\d|20)\.\d% on canary vs 0\.0% on stable", rec.state.reason
    )
    assert env["reg"].get_alias("demo", "production") == 1


def test_slow_canary_rolls_back(env: dict[str, Any]) -> None:
    env["backend"].behaviours = {2: Behaviour(latency_ms=500)}
    rec = deploy(env["settings"], "demo@2", "canary", steps=[50, 100], **FAST, backend=env["backend"])
    assert rec.status == "rolled_back" and rec.state.reason.startswith("p95 latency 500 ms")


def test_gate_rejection_blocks_deploy_unless_forced(env: dict[str, Any]) -> None:
    env["reg"].annotate("demo@2", "gate", {"decision": "rejected", "reasons": ["eval_split regressed"]})
    with pytest.raises(RolloutError, match=r"demo@2 was rejected by the validation gate \(eval_split regressed\)") as e:
        deploy(env["settings"], "demo@2", "canary", backend=env["backend"])
    assert "--force" in e.value.hint
    assert env["backend"].applied == [] and env["reg"].rollouts("demo") == []
    rec = deploy(env["settings"], "demo@2", "rolling", force=True, interval_s=0.2, backend=env["backend"])
    assert rec.status == "succeeded" and rec.plan["force"] is True


def test_second_rollout_is_refused_while_one_runs(env: dict[str, Any]) -> None:
    env["reg"].begin_rollout(
        "demo", from_version=1, to_version=2, strategy="canary", plan={}, owner=f"{socket.gethostname()}:{os.getpid()}"
    )
    with pytest.raises(RolloutInProgressError, match="is running"):
        deploy(env["settings"], "demo@2", "canary", backend=env["backend"])


def test_blue_green_switches_at_once_and_holds(env: dict[str, Any]) -> None:
    rec = deploy(env["settings"], "demo@2", "blue-green", **FAST, backend=env["backend"])
    assert rec.status == "succeeded"
    pcts = [a.table.canary_percent for a in env["backend"].applied]
    assert pcts == [0, 100, 100, 0, 0]  # green up, one switch, stable takes v2, back to stable, release
    assert [e["event"] for e in rec.history if e["event"] in ("smoke", "switch", "hold_passed", "promote")] == [
        "smoke",
        "switch",
        "hold_passed",
        "promote",
    ]
    assert env["reg"].aliases("demo") == {"production": 2, "previous": 1}


def test_blue_green_breach_in_hold_switches_back_and_restores_alias(env: dict[str, Any]) -> None:
    env["backend"].behaviours = {2: Behaviour(error_rate=0.5)}
    rec = deploy(env["settings"], "demo@2", "blue-green", interval_s=0.3, hold_s=2, backend=env["backend"])
    assert rec.status == "rolled_back"
    assert _final_app(env["backend"]) == (1, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 1}
    moves = [(h["alias"], h["from"], h["to"]) for h in env["reg"].alias_history("demo") if h["alias"] != "previous"]
    assert moves[-4:] == [("canary", None, 2), ("production", 1, 2), ("production", 2, 1), ("canary", 2, None)]


def test_blue_green_refuses_a_green_that_fails_its_smoke_test(env: dict[str, Any]) -> None:
    env["backend"].smoke_problems = ["slot canary: golden prompt 0 got status 500"]
    with pytest.raises(RolloutError, match="failed its smoke test"):
        deploy(env["settings"], "demo@2", "blue-green", **FAST, backend=env["backend"])
    rec = env["reg"].rollouts("demo")[0]
    assert rec.status == "failed" and _final_app(env["backend"]) == (1, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 1}


def test_rolling_swaps_stable_in_place(env: dict[str, Any]) -> None:
    rec = deploy(env["settings"], "demo@2", "rolling", interval_s=0.2, backend=env["backend"])
    assert rec.status == "succeeded"
    assert [a.version(CANARY) for a in env["backend"].applied] == [None] * len(env["backend"].applied)
    assert _final_app(env["backend"]) == (2, None, None, 0) and env["backend"].golden == [2]


def test_shadow_reports_and_changes_nothing_served(env: dict[str, Any]) -> None:
    env["backend"].behaviours = {2: Behaviour(shadow_agreement=0.75)}
    rec = deploy(env["settings"], "demo@2", "shadow", interval_s=0.5, backend=env["backend"])
    assert rec.status == "succeeded"
    report = rec.state.report
    assert report["pairs"] > 0 and report["exact_match_rate"] == 0.75 and report["shadow_versions"] == [2]
    assert report["verdict"] == "measured"
    assert all(a.table.canary_percent == 0 for a in env["backend"].applied)
    assert _final_app(env["backend"]) == (1, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 1}
    assert env["reg"].resolve("demo@2").annotations["shadow"]["rollout_id"] == rec.id


def test_a_promotion_ends_without_waiting_for_the_released_canary_to_stop(env: dict[str, Any]) -> None:
    """Once every stable replica serves the new version and no request goes to the canary, the rollout is done:
    the canary's engines stop on their own (as after a rollback), and `rayloop deploy` does not wait for them."""
    backend = env["backend"]

    def slow_to_stop(event: dict[str, Any]) -> None:
        if event["event"] == "promote":
            backend.stopping_slots.add(CANARY)

    rec = deploy(env["settings"], "demo@2", "canary", steps=[50, 100], **FAST, backend=backend, on_event=slow_to_stop)
    assert rec.status == "succeeded", rec.history[-3:]
    assert _final_app(backend) == (2, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 2, "previous": 1}


def test_a_shadow_run_ends_without_waiting_for_its_engines_to_stop(env: dict[str, Any]) -> None:
    backend = env["backend"]

    def slow_to_stop(event: dict[str, Any]) -> None:
        if event["event"] == "shadow_report":
            backend.stopping_slots.add(SHADOW)

    rec = deploy(env["settings"], "demo@2", "shadow", interval_s=0.5, backend=backend, on_event=slow_to_stop)
    assert rec.status == "succeeded" and rec.state.report["verdict"] == "measured"
    assert _final_app(backend) == (1, None, None, 0)
    assert all(a.table.shadow_percent == 0 for a in backend.applied[-1:])  # no stable replica mirrors


def test_canary_that_sees_no_traffic_is_inconclusive_and_rolls_back(env: dict[str, Any]) -> None:
    env["backend"].rps = 0  # nobody sends a request (or the stats actor lost every sample)
    rec = deploy(env["settings"], "demo@2", "canary", steps=[50, 100], **FAST, backend=env["backend"])
    assert rec.status == "rolled_back"
    assert rec.state.reason.startswith("inconclusive after"), rec.state.reason
    assert _events(rec, "step_passed") == [] and _events(rec, "promote") == []
    (inc,) = _events(rec, "inconclusive")
    assert inc["canary"]["requests"] == 0 and any("< 20 needed" in r for r in inc["reasons"])
    assert _final_app(env["backend"]) == (1, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 1}


def test_canary_step_waits_for_samples_before_judging(env: dict[str, Any]) -> None:
    # 10 requests/s at 10% canary: 1 canary request per second, 20 needed; the step waits past its
    # interval (up to max_step_wait_factor intervals), then fails closed instead of passing.
    env["backend"].rps = 10
    rec = deploy(env["settings"], "demo@2", "canary", steps=[10, 100], interval_s=1.0, backend=env["backend"])
    assert rec.status == "rolled_back" and "inconclusive" in rec.state.reason
    assert env["reg"].get_alias("demo", "production") == 1


def test_rolling_and_blue_green_without_traffic_rely_on_the_golden_check(env: dict[str, Any]) -> None:
    env["backend"].rps = 0
    rec = deploy(env["settings"], "demo@2", "rolling", interval_s=0.3, backend=env["backend"])
    assert rec.status == "succeeded" and env["reg"].get_alias("demo", "production") == 2
    rec = deploy(env["settings"], "demo@1", "blue-green", force=True, hold_s=0.3, backend=env["backend"])
    assert rec.status == "succeeded" and env["reg"].get_alias("demo", "production") == 1
    # Without traffic the golden check is all that judges them: a failing one stops the switch.
    env["backend"].smoke_problems = ["slot canary: golden prompt 0 got status 500"]
    with pytest.raises(RolloutError, match="failed its smoke test"):
        deploy(env["settings"], "demo@2", "blue-green", hold_s=0.3, backend=env["backend"])
    assert env["reg"].get_alias("demo", "production") == 1


def test_shadow_without_traffic_is_inconclusive(env: dict[str, Any]) -> None:
    env["backend"].rps = 0
    rec = deploy(env["settings"], "demo@2", "shadow", interval_s=0.3, backend=env["backend"])
    assert rec.status == "rolled_back"
    assert rec.state.report["verdict"] == "inconclusive" and rec.state.report["pairs"] == 0
    assert _final_app(env["backend"]) == (1, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 1}


def test_abort_command_reaches_a_running_controller(env: dict[str, Any]) -> None:
    out: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: out.update(
            rec=deploy(env["settings"], "demo@2", "canary", steps=[10, 100], interval_s=30, backend=env["backend"])
        )
    )
    t.start()
    deadline = time.monotonic() + 10
    while _phase(env["reg"]) != "step" and time.monotonic() < deadline:
        time.sleep(0.05)
    rec = send_command(env["settings"], "demo", "abort", by="test", wait_s=10)
    t.join(10)
    assert rec.status == "aborted" and out["rec"].status == "aborted"
    assert _events(rec, "command_received")[0]["by"] == "test"
    assert _final_app(env["backend"]) == (1, None, None, 0)


def test_promote_command_finishes_early(env: dict[str, Any]) -> None:
    t = threading.Thread(
        target=lambda: deploy(
            env["settings"], "demo@2", "canary", steps=[10, 100], interval_s=30, backend=env["backend"]
        )
    )
    t.start()
    deadline = time.monotonic() + 10
    while _phase(env["reg"]) != "step" and time.monotonic() < deadline:
        time.sleep(0.05)
    rec = send_command(env["settings"], "demo", "promote", by="test", wait_s=10)
    t.join(10)
    assert rec.status == "succeeded" and env["reg"].get_alias("demo", "production") == 2
    assert _final_app(env["backend"]) == (2, None, None, 0)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _orphan(env: dict[str, Any], phase: str) -> int:
    """A rollout whose controller died mid-way, with Serve left as it was."""
    reg: Registry = env["reg"]
    cfg2 = ModelConfig(model="demo", version=2, fingerprint=env["v2"].fingerprint)
    rid = reg.begin_rollout(
        "demo", from_version=1, to_version=2, strategy="canary", plan={}, owner=f"{socket.gethostname()}:{_dead_pid()}"
    )
    cfg1 = env["backend"].state.slots[STABLE]
    reg.update_rollout(
        rid,
        state=RolloutState(
            phase=phase,
            from_cfg=cfg1.model_dump(),
            to_cfg=cfg2.model_dump(),
            aliases_before={"production": 1, "previous": None, "canary": None},
        ),
    )
    reg.set_alias("demo", "canary", 2)
    env["backend"].apply(
        idle_state("demo", cfg1).model_copy(
            update={
                "slots": {STABLE: cfg1, CANARY: cfg2, SHADOW: None},
                "table": RouteTable(canary_percent=25, epoch=5),
            }
        )
    )
    return rid


def test_reconcile_rolls_back_an_orphaned_canary(env: dict[str, Any]) -> None:
    rid = _orphan(env, "step")
    assert not owner_alive(env["reg"].rollout(rid))
    out = reconcile(env["settings"], "demo", backend=env["backend"])
    assert out.action == "rolled_back" and out.rollout.status == "rolled_back"
    assert "is gone (phase step)" in out.rollout.state.reason
    assert _final_app(env["backend"]) == (1, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 1}
    assert reconcile(env["settings"], "demo", backend=env["backend"]).action == "none"


def test_reconcile_finishes_an_orphaned_promotion(env: dict[str, Any]) -> None:
    _orphan(env, "promoting")
    out = reconcile(env["settings"], "demo", backend=env["backend"])
    assert out.action == "rolled_forward"
    assert _final_app(env["backend"]) == (2, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 2, "previous": 1}


def test_deploy_again_after_a_crash_reconciles_first(env: dict[str, Any]) -> None:
    old = _orphan(env, "step")
    rec = deploy(env["settings"], "demo@2", "canary", steps=[100], interval_s=0.2, backend=env["backend"])
    assert env["reg"].rollout(old).status == "rolled_back" and rec.status == "succeeded"
    assert env["reg"].get_alias("demo", "production") == 2


def test_reconcile_repairs_serve_drift_without_a_rollout(env: dict[str, Any]) -> None:
    cfg1 = env["backend"].state.slots[STABLE]
    env["backend"].apply(env["backend"].state.model_copy(update={"table": RouteTable(canary_percent=30, epoch=9)}))
    out = reconcile(env["settings"], "demo", backend=env["backend"])
    assert out.action == "repaired"
    assert env["backend"].state.table.canary_percent == 0 and env["backend"].state.slots[STABLE] == cfg1


def test_rollback_without_active_rollout_returns_to_previous(env: dict[str, Any]) -> None:
    deploy(env["settings"], "demo@2", "rolling", interval_s=0.2, backend=env["backend"])
    rec = send_command(env["settings"], "demo", "rollback", backend=env["backend"])
    assert rec.status == "succeeded" and rec.to_version == 1
    assert env["reg"].get_alias("demo", "production") == 1 and _final_app(env["backend"]) == (1, None, None, 0)
    with pytest.raises(NotFoundError, match="no rollout of 'demo' is running"):
        send_command(env["settings"], "demo", "abort", backend=env["backend"])


def test_first_deploy_starts_the_app(tmp_path: Path) -> None:
    settings = load_settings(env={"RAYLOOP_HOME": str(tmp_path / "home")})
    reg = Registry.from_settings(settings)
    reg.register("demo", make_model_dir(tmp_path / "m1", seed=1))
    backend = FakeBackend()
    rec = deploy(settings, "demo@1", "canary", backend=backend)
    assert rec.status == "succeeded" and rec.from_version is None
    assert _final_app(backend) == (1, None, None, 0) and reg.get_alias("demo", "production") == 1
    assert reg.deployments("demo")[0]["slot"] == "stable"


def test_failed_serve_change_rolls_back_and_raises(env: dict[str, Any]) -> None:
    env["backend"].fail_apply_when = lambda st: st.table.canary_percent == 50
    with pytest.raises(RolloutError, match="failed and was rolled back: RuntimeError: simulated Serve failure"):
        deploy(env["settings"], "demo@2", "canary", steps=[10, 50, 100], **FAST, backend=env["backend"])
    assert env["reg"].rollouts("demo")[0].status == "failed"
    assert _final_app(env["backend"]) == (1, None, None, 0)


def test_a_canary_that_lost_its_node_mid_step_is_rolled_back_without_waiting_for_it(env: dict[str, Any]) -> None:
    """The canary's replicas cannot start again (their node died, no room elsewhere): the next step's wait fails,
    and the way back waits only for the stable slot, not for the canary it releases."""
    backend = env["backend"]

    def lose_the_canary_node(event: dict[str, Any]) -> None:
        if event["event"] == "step" and event["percent"] == 10:
            backend.unready_slots.add(CANARY)

    with pytest.raises(RolloutError, match="slot canary did not become ready"):
        deploy(
            env["settings"],
            "demo@2",
            "canary",
            steps=[10, 100],
            **FAST,
            backend=backend,
            on_event=lose_the_canary_node,
        )
    rec = env["reg"].rollouts("demo")[0]
    assert rec.status == "failed" and _events(rec, "rollback") and not _events(rec, "rollback_failed")
    assert _final_app(backend) == (1, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 1}
    assert env["reg"].active_rollout("demo") is None


def test_a_replica_is_late_once_it_has_gone_the_placement_timeout_without_a_node() -> None:
    """Each replica's time without a node counts from when it was first seen without one; a replica that got
    its node, or that Serve is stopping, no longer counts."""
    now = [0.0]
    watch = PlacementWatch(20, clock=lambda: now[0])
    watch.check("rayloop", {"c1": "STARTING"})
    now[0] = 15.0
    watch.check("rayloop", {"c1": "STARTING", "c2": "STARTING"})
    now[0] = 19.9
    watch.check("rayloop", {"c2": "STARTING"})  # c1 got its node
    now[0] = 25.0
    watch.check("rayloop", {"c1": "STARTING", "c2": "STOPPING"})  # c1 is back: from zero
    now[0] = 44.9
    watch.check("rayloop", {"c1": "STARTING", "c3": "STARTING"})
    now[0] = 45.0
    with pytest.raises(RolloutError) as e:
        watch.check("rayloop", {"c1": "STARTING", "c3": "STARTING"})
    assert "1 replica(s) found no node within 20s (c1)" in e.value.message
    assert "rollout.placement_timeout_s" in (e.value.hint or "")


def test_a_replica_that_finds_no_node_mid_step_ends_the_step_at_the_placement_timeout(env: dict[str, Any]) -> None:
    """A node dies during a step's hold and Serve cannot place its replicas again: with
    ``rollout.placement_timeout_s`` the step fails once a replica has gone that long without a node (it is not
    judged passed on the traffic the rest answered), and the rollout rolls back; without it, only the next
    wait for Serve would notice."""
    backend = env["backend"]
    settings = env["settings"]
    # The node ran a canary and a stable replica; neither finds room elsewhere (the way back must not wait for
    # the stable one: its room is the canary's, free once the rollback has released it).
    lost = {"SERVE_REPLICA::rayloop#llm-canary#c2": "STARTING", "SERVE_REPLICA::rayloop#llm-stable#s2": "STARTING"}

    def lose_a_node(event: dict[str, Any]) -> None:
        if event["event"] == "step" and event["percent"] == 10:
            backend.unplaced_replicas = dict(lost)

    timed = settings.model_copy(update={"rollout": settings.rollout.model_copy(update={"placement_timeout_s": 0.5})})
    started = time.monotonic()
    with pytest.raises(RolloutError, match=r"2 replica\(s\) found no node within 0.5s \(SERVE_REPLICA::rayloop#llm-"):
        deploy(timed, "demo@2", "canary", steps=[10, 100], interval_s=60, backend=backend, on_event=lose_a_node)
    assert time.monotonic() - started < 30  # not the step's 60 s hold
    rec = env["reg"].rollouts("demo")[0]
    assert rec.status == "failed" and not _events(rec, "step_passed") and _events(rec, "rollback"), rec.history
    assert not _events(rec, "rollback_failed"), rec.history
    assert _final_app(backend) == (1, None, None, 0) and env["reg"].aliases("demo") == {"production": 1}

    # Unset, a replica without a node does not end the step (the rest of the canary answers, and passes).
    backend.unplaced_replicas = {}
    rec = deploy(settings, "demo@2", "canary", steps=[10, 100], **FAST, backend=backend, on_event=lose_a_node)
    assert rec.status == "succeeded" and backend.unplaced_replicas == lost


def test_a_rollback_does_not_wait_for_stable_replicas_that_need_the_released_canarys_room(
    env: dict[str, Any],
) -> None:
    """A node with a stable and a canary replica dies mid-step: neither slot is whole again, and the surviving
    node's room for the lost stable replica is held by the canary's. The way back must not wait for the stable
    slot to be whole before it releases the canary (it never would be): it moves traffic back and releases the
    canary with the running stable replicas serving the old version, and then the slot can be whole."""
    backend = env["backend"]

    def lose_a_node(event: dict[str, Any]) -> None:
        if event["event"] == "step" and event["percent"] == 10:
            backend.unready_slots.add(CANARY)
            backend.short_slots[STABLE] = CANARY

    with pytest.raises(RolloutError, match="slot canary did not become ready"):
        deploy(env["settings"], "demo@2", "canary", steps=[10, 100], **FAST, backend=backend, on_event=lose_a_node)
    rec = env["reg"].rollouts("demo")[0]
    assert rec.status == "failed" and _events(rec, "rollback") and not _events(rec, "rollback_failed"), rec.history
    assert _final_app(backend) == (1, None, None, 0)
    assert backend.short_slots == {}  # the canary's room is free: Serve can make the stable slot whole
    assert env["reg"].aliases("demo") == {"production": 1}


def test_a_promotion_with_no_room_for_its_golden_record_rolls_back_before_production_moves(
    env: dict[str, Any],
) -> None:
    """Promoting swaps the stable slot in place, verified against golden answers a fresh engine records. When
    that engine finds no room (a node died mid-canary), the recording times out: the rollout rolls back, and
    production never named the new version, not even for a moment."""
    from rayloop.errors import ServingError

    backend = env["backend"]
    backend.golden_error = ServingError("recording the golden answers of demo v2 did not finish within 1s")
    with pytest.raises(RolloutError, match=r"failed and was rolled back: .*golden answers"):
        deploy(
            env["settings"],
            "demo@2",
            "canary",
            steps=[50, 100],
            **FAST,
            backend=backend,
        )
    rec = env["reg"].rollouts("demo")[0]
    assert rec.status == "failed" and _events(rec, "promote") and _events(rec, "rollback")
    assert not _events(rec, "rollback_failed")
    assert not [e for e in rec.history if e["event"] == "alias" and e.get("alias") == "production"], rec.history
    assert _final_app(backend) == (1, None, None, 0)
    assert env["reg"].aliases("demo") == {"production": 1}


def test_aliases_go_back_even_when_serve_cannot_roll_back(env: dict[str, Any]) -> None:
    """Serve refuses every change once the promotion began: the rollback cannot reach Serve, but the registry
    must not keep naming the new version production (nor canary)."""
    backend = env["backend"]
    promoting: list[bool] = []
    backend.fail_apply_when = lambda st: bool(promoting)
    with pytest.raises(RolloutError, match="and so did its rollback") as err:
        deploy(
            env["settings"],
            "demo@2",
            "canary",
            steps=[100],
            **FAST,
            backend=backend,
            on_event=lambda e: promoting.append(True) if e["event"] == "promote" else None,
        )
    rec = env["reg"].rollouts("demo")[0]
    assert rec.status == "failed" and _events(rec, "rollback_failed")
    assert "--reconcile" in (err.value.hint or "")
    assert env["reg"].aliases("demo") == {"production": 1}
    assert env["reg"].active_rollout("demo") is None


def test_status_reports_slots_aliases_and_live_metrics(env: dict[str, Any]) -> None:
    deploy(env["settings"], "demo@2", "canary", steps=[100], interval_s=0.2, backend=env["backend"])
    time.sleep(0.1)  # some simulated traffic on the promoted stable slot
    st = status(env["settings"], "demo", backend=env["backend"])
    assert st["serve"]["slots"] == {"stable": 2, "canary": None, "shadow": None}
    m = st["models"]["demo"]
    assert m["aliases"] == {"production": 2, "previous": 1}
    assert m["last_rollout"]["status"] == "succeeded" and m["active_rollout"] is None
    assert st["live"]["stable"]["requests"] > 0


def test_argo_style_settings_and_their_old_names(tmp_path: Path) -> None:
    from rayloop.config import RolloutSettings

    assert RolloutSettings(min_requests_per_step=7).min_samples == 7  # an existing rayloop.yaml keeps working
    assert RolloutSettings(min_samples=9).min_samples == 9
    s = load_settings(env={"RAYLOOP_HOME": str(tmp_path)}, overrides={"rollout": {"min_requests_per_step": 5}})
    assert s.rollout.min_samples == 5
    with pytest.raises(ConfigError, match="inconclusive"):
        load_settings(env={"RAYLOOP_HOME": str(tmp_path)}, overrides={"rollout": {"inconclusive": "promote"}})


def test_dry_run_records_a_breach_and_acts_on_none(env: dict[str, Any]) -> None:
    env["backend"].behaviours = {2: Behaviour(error_rate=0.2)}
    settings = env["settings"].model_copy(
        update={"rollout": env["settings"].rollout.model_copy(update={"dry_run": True})}
    )
    rec = deploy(settings, "demo@2", "canary", steps=[50, 100], **FAST, backend=env["backend"])
    assert rec.status == "succeeded" and env["reg"].get_alias("demo", "production") == 2
    assert _events(rec, "dry_run_breach") and not _events(rec, "breach") and not _events(rec, "rollback")


def test_failure_limit_tolerates_failed_judgements_but_not_a_failing_step(env: dict[str, Any]) -> None:
    env["backend"].behaviours = {2: Behaviour(error_rate=0.2)}
    lenient = env["settings"].rollout.model_copy(update={"failure_limit": 1000})
    settings = env["settings"].model_copy(update={"rollout": lenient})
    rec = deploy(settings, "demo@2", "canary", steps=[50, 100], **FAST, backend=env["backend"])
    # Every judgement failed: tolerated while the step ran, but it ended failing, so it rolls back.
    assert rec.status == "rolled_back" and "error rate" in rec.state.reason
    assert env["reg"].get_alias("demo", "production") == 1


def test_measurement_errors_in_a_row_make_the_step_inconclusive(env: dict[str, Any]) -> None:
    env["backend"].window_errors = 2  # a blip: within consecutive_error_limit (4), the rollout goes on
    rec = deploy(env["settings"], "demo@2", "canary", steps=[50, 100], **FAST, backend=env["backend"])
    assert rec.status == "succeeded" and len(_events(rec, "measurement_error")) == 2
    env["backend"].window_errors = 10**6  # the stats actor is gone for good
    rec = deploy(env["settings"], "demo@1", "canary", steps=[50, 100], force=True, **FAST, backend=env["backend"])
    assert rec.status == "rolled_back" and "measurements in a row failed" in rec.state.reason
    assert env["reg"].get_alias("demo", "production") == 2


def test_a_stats_store_that_restarts_mid_step_rolls_the_canary_back(env: dict[str, Any]) -> None:
    """A restarted stats actor comes back empty: the step it restarted in cannot pass on what came after."""
    backend: FakeBackend = env["backend"]

    def restart_at_first_step(e: dict[str, Any]) -> None:
        if e["event"] == "step" and e["percent"] == 50:
            backend.stats_started = time.time() + 0.1  # killed and started again 0.1 s into the step

    rec = deploy(
        env["settings"], "demo@2", "canary", steps=[50, 100], **FAST, backend=backend, on_event=restart_at_first_step
    )
    assert rec.status == "rolled_back", rec.state
    assert "StatsLost" in rec.state.reason and "restarted" in rec.state.reason
    assert [e["percent"] for e in _events(rec, "step")] == [50]
    assert env["reg"].get_alias("demo", "production") == 1
    # Steps that begin after the restart are judged as before.
    rec = deploy(env["settings"], "demo@2", "canary", steps=[50, 100], **FAST, backend=backend)
    assert rec.status == "succeeded" and env["reg"].get_alias("demo", "production") == 2


def test_an_inconclusive_step_can_hold_until_a_person_decides(env: dict[str, Any]) -> None:
    env["backend"].rps = 0
    hold = env["settings"].rollout.model_copy(update={"inconclusive": "hold"})
    settings = env["settings"].model_copy(update={"rollout": hold})
    out: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: out.update(
            rec=deploy(settings, "demo@2", "canary", steps=[50, 100], **FAST, backend=env["backend"])
        )
    )
    t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        active = env["reg"].active_rollout("demo")
        if active is not None and active.state.phase == "holding":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the rollout never held")
    # Holding: canary keeps its share, nothing was promoted.
    assert env["backend"].state.table.canary_percent == 50 and env["reg"].get_alias("demo", "production") == 1
    send_command(settings, "demo", "abort", backend=env["backend"], wait_s=20)
    t.join(timeout=20)
    assert out["rec"].status == "aborted" and env["reg"].get_alias("demo", "production") == 1
    assert _final_app(env["backend"]) == (1, None, None, 0)


_PAUSED_CONTROLLER = """
import sys
from rayloop.config import load_settings
from rayloop.registry import Registry
from rayloop.rollout.controller import deploy
from rayloop.rollout.fake_backend import FakeBackend
from rayloop.serving.app import idle_state
from rayloop.serving.protocol import ModelConfig
from rayloop.serving.routing import STABLE, RouteTable

settings = load_settings(env={"RAYLOOP_HOME": sys.argv[1]}, overrides={"rollout": {"lease_s": 1.5}})
v1 = Registry.from_settings(settings).resolve("demo@1")
cfg1 = ModelConfig(model="demo", version=1, fingerprint=v1.fingerprint)
backend = FakeBackend(state=idle_state("demo", cfg1, RouteTable(versions={STABLE: 1})))
try:
    rec = deploy(settings, "demo@2", "canary", steps=[50, 100], interval_s=60, backend=backend)
    print("RESULT", rec.status, flush=True)
except Exception as e:
    print("ERROR", type(e).__name__, e, flush=True)
"""


def _pause_outside_a_write(proc: subprocess.Popen[str], registry_url: str) -> None:
    """SIGSTOP ``proc`` at a moment it holds no write lock on the SQLite registry. Paused inside a write
    transaction, it would hold SQLite's one write lock, and nobody could write until it resumed (PostgreSQL
    locks rows, not the database); this test is about a controller paused between its writes."""
    import signal
    import sqlite3

    path = registry_url.removeprefix("sqlite:///")
    for _ in range(20):
        proc.send_signal(signal.SIGSTOP)
        probe = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:  # paused mid-write: let it finish, then pause it again
            proc.send_signal(signal.SIGCONT)
            free = sqlite3.connect(path, timeout=30, isolation_level=None)
            free.execute("BEGIN IMMEDIATE")
            free.execute("ROLLBACK")
            free.close()
        finally:
            probe.close()
    raise AssertionError("the controller was inside a write transaction every time it was paused")


def test_a_controller_paused_past_its_lease_stops_instead_of_writing(env: dict[str, Any]) -> None:
    import signal

    home = str(env["settings"].home_path)
    a = subprocess.Popen([sys.executable, "-c", _PAUSED_CONTROLLER, home], stdout=subprocess.PIPE, text=True)
    try:
        reg: Registry = env["reg"]
        deadline = time.monotonic() + 60
        while _phase(reg) != "step":
            assert time.monotonic() < deadline and a.poll() is None, "controller A never reached its first step"
            time.sleep(0.05)
        rid = reg.active_rollout("demo").id
        _pause_outside_a_write(a, env["settings"].registry_url)  # A is paused (a long GC, a stopped VM)
        while reg.lease(rid).expires_at > time.time():
            time.sleep(0.05)
        # B takes over (a new fencing token) and rolls the orphaned canary back.
        settings = env["settings"].model_copy(
            update={"rollout": env["settings"].rollout.model_copy(update={"lease_s": 1.5})}
        )
        out = reconcile(settings, "demo", backend=env["backend"])
        assert out.action == "rolled_back" and reg.lease(rid).token == 2
        events_after_b = len(reg.rollout(rid).history)
        a.send_signal(signal.SIGCONT)  # A wakes up: its next write is refused, and it stops
        stdout, _ = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
    assert "ERROR LeaseLostError" in stdout, stdout
    record = reg.rollout(rid)
    assert record.status == "rolled_back" and len(record.history) == events_after_b
    assert reg.aliases("demo") == {"production": 1}


def test_a_reused_pid_cannot_keep_a_rollout_stuck(env: dict[str, Any]) -> None:
    """The owner's PID now belongs to another live process (this one): its expired lease still frees the rollout."""
    reg: Registry = env["reg"]
    rid = reg.begin_rollout(
        "demo",
        from_version=1,
        to_version=2,
        strategy="canary",
        plan={},
        owner=f"{socket.gethostname()}:{os.getpid()}",
        lease_s=0.3,
    )
    reg.update_rollout(rid, state=RolloutState(phase="step"))
    while reg.lease(rid).expires_at > time.time():
        time.sleep(0.05)
    assert not owner_alive(reg.rollout(rid), lease=reg.lease(rid))
    assert reconcile(env["settings"], "demo", backend=env["backend"]).action == "rolled_back"


def test_rolling_a_version_over_production_needs_the_gate_or_force(env: dict[str, Any], tmp_path: Path) -> None:
    reg: Registry = env["reg"]
    reg.register("demo", make_model_dir(tmp_path / "m3", seed=3))  # never evaluated
    with pytest.raises(RolloutError, match=r"demo@3 has no accepted gate decision \(never evaluated\)") as e:
        deploy(env["settings"], "demo@3", "rolling", interval_s=0.2, backend=env["backend"])
    assert "rayloop eval demo@3" in (e.value.hint or "") and env["reg"].rollouts("demo") == []
    rec = deploy(env["settings"], "demo@3", "rolling", interval_s=0.2, force=True, backend=env["backend"])
    assert rec.status == "succeeded" and reg.get_alias("demo", "production") == 3
    # Back to the version that was production before: it was vouched for then.
    rec = deploy(env["settings"], "demo@1", "rolling", interval_s=0.2, backend=env["backend"])
    assert rec.status == "succeeded" and reg.get_alias("demo", "production") == 1
