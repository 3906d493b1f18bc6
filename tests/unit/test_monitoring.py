"""Monitoring without a cluster: the loop metrics read from a registry, the serving gauges, the dashboard and
alert rules as data (the real Prometheus runs them in tests/integration/test_rollout.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import rayloop
from rayloop.config import Settings
from rayloop.monitoring import assets
from rayloop.monitoring.loop import LoopExporter, loop_snapshot, rollback_reason
from rayloop.registry import Registry
from rayloop.serving import metrics as serving_metrics
from rayloop.serving.routing import RouteTable
from tests.registry_util import make_model_dir

pytestmark = pytest.mark.unit
REPO = Path(rayloop.__file__).parent.parent


@pytest.fixture
def reg(settings: Settings, base_files: Path) -> Registry:
    r = Registry.from_settings(settings)
    for _ in range(3):
        r.register("demo", base_files)
    return r


@pytest.fixture
def base_files(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


def _rollout(reg: Registry, status: str, events: list[dict[str, Any]], *, end: bool = True) -> int:
    rid = reg.begin_rollout("demo", from_version=1, to_version=2, strategy="canary", plan={}, owner="test")
    for ev in events:
        reg.update_rollout(rid, event=ev)
    if end:
        reg.end_rollout(rid, status)
    return rid


def test_rollback_reasons_are_a_bounded_set_read_from_the_history(reg: Registry) -> None:
    cases = {
        "analysis_failed": ("rolled_back", [{"event": "step_passed"}, {"event": "breach"}, {"event": "rollback"}]),
        "inconclusive": ("rolled_back", [{"event": "inconclusive"}, {"event": "rollback"}]),
        "command": ("rolled_back", [{"event": "command_received", "command": "rollback"}, {"event": "rollback"}]),
        "controller_lost": ("rolled_back", [{"event": "reconcile", "forward": False}, {"event": "rollback"}]),
        "aborted": ("aborted", [{"event": "command_received", "command": "abort"}]),
        "error": ("failed", [{"event": "rollback"}]),
        None: ("succeeded", [{"event": "step_passed"}, {"event": "promote"}]),
    }
    for want, (status, events) in cases.items():
        record = reg.rollout(_rollout(reg, status, events))
        assert rollback_reason(record) == want, (want, status, events)


def test_the_loop_snapshot_counts_verdicts_rollouts_rollbacks_and_gate_decisions(reg: Registry) -> None:
    _rollout(reg, "rolled_back", [{"event": "step_passed"}, {"event": "breach"}])
    _rollout(reg, "succeeded", [{"event": "step_passed"}, {"event": "step_passed"}, {"event": "promote"}])
    reg.annotate("demo@2", "gate", {"decision": "accepted"})
    reg.annotate("demo@3", "gate", {"decision": "rejected"})
    running = _rollout(reg, "", [{"event": "step_passed"}], end=False)
    reg.update_rollout(running, state=reg.rollout(running).state.updated(phase="step", step=1, percent=25.0))

    snap = loop_snapshot(reg.rollouts("demo"), reg.list_versions("demo"))
    assert dict(snap.analysis) == {"pass": 4, "fail": 1}
    assert dict(snap.rollouts) == {("canary", "rolled_back"): 1, ("canary", "succeeded"): 1}
    assert dict(snap.rollbacks) == {"analysis_failed": 1}
    assert dict(snap.gate) == {"accepted": 1, "rejected": 1}
    assert (snap.active, snap.step, snap.canary_weight) == (True, 2, 0.25)
    assert snap.last_rollback is not None


class _Metric:
    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name = name
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def _key(self, tags: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((tags or {}).items()))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert value > 0, "Ray's counters refuse increments <= 0"
        k = self._key(tags)
        self.values[k] = self.values.get(k, 0.0) + value

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values[self._key(tags)] = value

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.inc(1.0, tags)


class _FakeMetrics:
    Counter = Gauge = Histogram = _Metric


def _value(metric: _Metric, **tags: str) -> float | None:
    return metric.values.get(tuple(sorted(tags.items())))


def test_the_exporter_sends_increments_up_to_the_registrys_totals(settings: Settings, reg: Registry) -> None:
    exporter = LoopExporter(settings, "demo", interval_s=60, metrics=_FakeMetrics)
    exporter.poll()
    assert _value(exporter._gauges["active"], model="demo") == 0.0
    assert exporter._counters["rollbacks"].values == {}  # no series before the first event

    _rollout(reg, "rolled_back", [{"event": "breach"}])
    exporter.poll()
    exporter.poll()  # the same totals again: nothing added
    assert _value(exporter._counters["rollbacks"], model="demo", reason="analysis_failed") == 1.0
    assert _value(exporter._counters["analysis"], model="demo", verdict="fail") == 1.0
    assert _value(exporter._counters["rollouts"], model="demo", strategy="canary", status="rolled_back") == 1.0
    last = _value(exporter._gauges["last_rollback"], model="demo")
    assert last is not None and last > 1.7e9


def test_traffic_weights_follow_the_route_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving_metrics, "metrics_module", lambda: _FakeMetrics)
    m = serving_metrics.ServingMetrics()
    m.set_traffic("demo", RouteTable(), 1)
    assert _value(m.traffic, model="demo", version="1", slot="stable") == 1.0
    canary = RouteTable(canary_percent=25.0, versions={"stable": 1, "canary": 2})
    m.set_traffic("demo", canary, 1)
    assert _value(m.traffic, model="demo", version="1", slot="stable") == 0.75
    assert _value(m.traffic, model="demo", version="2", slot="canary") == 0.25
    m.set_traffic("demo", RouteTable(versions={"stable": 2}), 2)  # promoted: the old series go to 0
    assert _value(m.traffic, model="demo", version="2", slot="stable") == 1.0
    assert _value(m.traffic, model="demo", version="1", slot="stable") == 0.0
    assert _value(m.traffic, model="demo", version="2", slot="canary") == 0.0
    kept = {dict(tags)["version"] + dict(tags)["slot"] for tags in m._current("traffic")}
    assert kept == {"2stable"}, "only live series are re-reported"


def test_request_metrics_are_in_seconds_with_a_status_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving_metrics, "metrics_module", lambda: _FakeMetrics)
    m = serving_metrics.ServingMetrics()
    tags = {"model": "demo", "version": "1", "slot": "stable"}
    m.observe_request(tags, "chat", 503, 1.5, 0.5, 7, 11)
    assert _value(m.requests, **tags, endpoint="chat", code="503", status_class="5xx") == 1.0
    assert _value(m.prompt_tokens, **tags) == 7 and _value(m.generation_tokens, **tags) == 11
    assert serving_metrics.NoMetrics().observe_request(tags, "chat", 200, 1.0, None, None, 0) is None


def test_the_real_metric_classes_accept_every_definition() -> None:
    """Ray validates names, tag keys and bucket bounds when a metric is made (positive bounds only): build
    every metric with Ray's own classes (no cluster needed to construct them)."""
    from ray.util import metrics as ray_metrics

    m = serving_metrics.ServingMetrics()
    assert m.requests is not None
    for tags in ({"model": "demo", "version": "1"},):
        m.observe_feedback(tags["model"], 1, -1)
    LoopExporter(Settings(), "demo", interval_s=60, metrics=ray_metrics)


def _defined_metric_names() -> set[str]:
    names: set[str] = set()
    for f in ("rayloop/serving/metrics.py", "rayloop/monitoring/loop.py", "rayloop/data/capture.py"):
        names |= set(re.findall(r'"(rayloop_[a-z_]+)"', (REPO / f).read_text()))
    return names


def test_every_metric_the_dashboard_and_rules_use_is_exported_by_rayloop_or_vllm() -> None:
    from vllm.v1.metrics import loggers

    # (Ray exports a counter as NAME_total)
    vllm_names = {
        n.replace(":", "_") + suffix
        for n in re.findall(r'name="(vllm:[a-z_]+)"', Path(loggers.__file__).read_text())
        for suffix in ("", "_total")
    }
    defined = {f"ray_{n}" for n in _defined_metric_names() | vllm_names}
    exprs = [q.expr for _, q in assets.queries()] + [a.expr for a in assets.ALERTS]
    used = {m for e in exprs for m in re.findall(r"\b(ray_[a-z_]+?)(?:_bucket|_sum|_count)?\b(?=[{\[ )]|$)", e)}
    assert used, exprs
    unknown = {m for m in used if m not in defined}
    assert not unknown, unknown


def test_committed_dashboard_and_rules_are_what_the_code_generates(tmp_path: Path) -> None:
    for path in assets.write_files(tmp_path):
        committed = REPO / "cluster" / "monitoring" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `python -m rayloop.monitoring.assets cluster/monitoring`"
        )


def test_the_dashboard_is_a_grafana_model_with_a_model_variable() -> None:
    dash = json.loads(json.dumps(assets.grafana_dashboard()))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "model"}
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) == sum(len(r.panels) for r in assets.ROWS)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        box = p["gridPos"]
        assert box["x"] + box["w"] <= 24


def test_alert_rules_load_as_prometheus_rule_groups() -> None:
    doc = yaml.safe_load((REPO / "cluster" / "monitoring" / assets.RULES_FILE).read_text())
    rules = doc["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {a.name for a in assets.ALERTS}
    assert "RayloopRollbackHappened" in {r["alert"] for r in rules}
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"]
