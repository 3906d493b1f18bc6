"""Rollout and gate metrics, derived from the registry (the loop's system of record).

A rollout's controller may run anywhere (the CLI, a Ray job, another host) and may die; its metrics would
die with it. So they are read back from what the registry keeps, as kube-state-metrics reads Kubernetes
objects: every engine ingress replica of a model polls the registry and exports

==============================================  =========  ==========================================
name                                            kind       labels
==============================================  =========  ==========================================
rayloop_rollout_active                          gauge      model (1 while a rollout runs)
rayloop_rollout_step                            gauge      model (canary: 1-based step; 0 otherwise)
rayloop_rollout_canary_weight                   gauge      model (share 0-1 the rollout gives the new
                                                           version now)
rayloop_rollout_analysis_total                  counter    model, verdict (pass, fail, inconclusive)
rayloop_rollouts_total                          counter    model, strategy, status (ended rollouts)
rayloop_rollbacks_total                         counter    model, reason
rayloop_rollout_last_rollback_timestamp_seconds gauge      model (UNIX time of the last rollback)
rayloop_gate_decisions_total                    counter    model, decision (accepted, rejected)
rayloop_pipeline_stages_total                   counter    model, stage, status (done, skipped, failed)
rayloop_pipeline_stage_last_duration_seconds    gauge      model, stage (its latest run)
rayloop_pipeline_last_run_timestamp_seconds     gauge      model (when the latest run last changed)
==============================================  =========  ==========================================

The pipeline's numbers come from its run records (``pipelines/MODEL/runs/*.json`` in storage, written as
each stage ends; see :mod:`rayloop.pipeline`).

Counters equal the registry's totals: a restarted replica starts at the total, which Prometheus' ``rate``
and ``increase`` do not count as an increase, and a series appears with its first event (so alert on "a
rollback happened" with the timestamp gauge, not with ``increase`` of the counter). Several replicas export
the same values: aggregate with ``max by (model, ...)``, never ``sum``.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayloop.config import Settings
    from rayloop.registry import ModelVersion, RolloutRecord

logger = logging.getLogger("rayloop")

# Events of a rollout's history that carry the analysis verdict of a step (see rayloop.rollout.controller).
VERDICT_EVENTS = {
    "step_passed": "pass",
    "watch_passed": "pass",
    "hold_passed": "pass",
    "breach": "fail",
    "inconclusive": "inconclusive",
    "hold": "inconclusive",
}
ROLLED_BACK = {"rolled_back", "aborted", "failed"}
ROLLBACK_REASONS = ("aborted", "command", "analysis_failed", "inconclusive", "controller_lost", "error")


def rollback_reason(record: RolloutRecord) -> str | None:
    """Why an ended rollout went back to the old version, as one of :data:`ROLLBACK_REASONS` (a bounded label
    set; the full reason is in the record), or None when it did not."""
    if record.status not in ROLLED_BACK or record.active:
        return None
    if record.status == "aborted":
        return "aborted"
    if record.status == "failed":
        return "error"
    events = [str(ev.get("event")) for ev in record.history]
    if "command_received" in events:
        return "command"
    if "reconcile" in events:
        return "controller_lost"
    if "breach" in events:
        return "analysis_failed"
    if "inconclusive" in events:
        return "inconclusive"
    return "error"


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


@dataclass
class LoopSnapshot:
    """What the registry says about one model's loop, as metric values."""

    active: bool = False
    step: int = 0
    canary_weight: float = 0.0
    analysis: collections.Counter[str] = field(default_factory=collections.Counter)
    rollouts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    rollbacks: collections.Counter[str] = field(default_factory=collections.Counter)
    last_rollback: float | None = None
    gate: collections.Counter[str] = field(default_factory=collections.Counter)
    stages: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    last_run: float | None = None


def add_pipeline_runs(snap: LoopSnapshot, runs: list[dict[str, Any]]) -> None:
    """Stage outcomes of every run, and the stage durations of the latest run that ran each stage."""
    latest: dict[str, tuple[float, float]] = {}
    for run in runs:
        updated = float(run.get("updated_at") or run.get("created_at") or 0.0)
        if snap.last_run is None or updated > snap.last_run:
            snap.last_run = updated
        for stage, rec in (run.get("stages") or {}).items():
            if not isinstance(rec, dict):
                continue
            snap.stages[(str(stage), str(rec.get("status")))] += 1
            finished = float(rec.get("finished_at") or 0.0)
            if rec.get("seconds") is not None and finished >= latest.get(stage, (-1.0, 0.0))[0]:
                latest[stage] = (finished, float(rec["seconds"]))
    snap.stage_seconds = {stage: seconds for stage, (_, seconds) in latest.items()}


def loop_snapshot(rollouts: list[RolloutRecord], versions: list[ModelVersion]) -> LoopSnapshot:
    snap = LoopSnapshot()
    for r in rollouts:
        for ev in r.history:
            verdict = VERDICT_EVENTS.get(str(ev.get("event")))
            if verdict is not None:
                snap.analysis[verdict] += 1
        if r.active:
            snap.active = True
            if r.state.step is not None:
                snap.step = r.state.step + 1
            if r.state.percent is not None:
                snap.canary_weight = r.state.percent / 100.0
            continue
        snap.rollouts[(r.strategy, r.status)] += 1
        reason = rollback_reason(r)
        if reason is not None:
            snap.rollbacks[reason] += 1
            ended = _timestamp(r.ended_at)
            if ended is not None and (snap.last_rollback is None or ended > snap.last_rollback):
                snap.last_rollback = ended
    for v in versions:
        gate = v.annotations.get("gate")
        decision = gate.get("decision") if isinstance(gate, dict) else None
        if decision:
            snap.gate[str(decision)] += 1
    return snap


class LoopExporter:
    """Polls the registry every ``interval_s`` and exports one model's :class:`LoopSnapshot`."""

    def __init__(self, settings: Settings, model: str, interval_s: float, *, metrics: Any = None) -> None:
        """``metrics``: the module with ``Counter`` and ``Gauge`` (default Ray's ``ray.util.metrics``)."""
        if metrics is None:
            from ray.util import metrics
        m = metrics
        self.settings, self.model, self.interval_s = settings, model, interval_s
        self._gauges = {
            "active": m.Gauge("rayloop_rollout_active", "1 while a rollout of the model runs.", tag_keys=("model",)),
            "step": m.Gauge(
                "rayloop_rollout_step", "Canary step the running rollout is at (1-based; 0: none).", tag_keys=("model",)
            ),
            "weight": m.Gauge(
                "rayloop_rollout_canary_weight",
                "Share (0-1) of traffic the running rollout gives the new version.",
                tag_keys=("model",),
            ),
            "last_rollback": m.Gauge(
                "rayloop_rollout_last_rollback_timestamp_seconds",
                "UNIX time the model's last rollback ended.",
                tag_keys=("model",),
            ),
        }
        self._counters = {
            "analysis": m.Counter(
                "rayloop_rollout_analysis_total", "Analysis verdicts of rollout steps.", tag_keys=("model", "verdict")
            ),
            "rollouts": m.Counter(
                "rayloop_rollouts_total",
                "Ended rollouts by strategy and status.",
                tag_keys=("model", "strategy", "status"),
            ),
            "rollbacks": m.Counter(
                "rayloop_rollbacks_total", "Rollouts that went back to the old version.", tag_keys=("model", "reason")
            ),
            "gate": m.Counter(
                "rayloop_gate_decisions_total", "Validation gate decisions on versions.", tag_keys=("model", "decision")
            ),
            "stages": m.Counter(
                "rayloop_pipeline_stages_total",
                "Pipeline stages by outcome, over all runs.",
                tag_keys=("model", "stage", "status"),
            ),
        }
        self._stage_seconds = m.Gauge(
            "rayloop_pipeline_stage_last_duration_seconds",
            "Seconds the stage took in the latest pipeline run that ran it.",
            tag_keys=("model", "stage"),
        )
        self._last_run = m.Gauge(
            "rayloop_pipeline_last_run_timestamp_seconds",
            "UNIX time the latest pipeline run of the model last changed.",
            tag_keys=("model",),
        )
        self._runs: dict[str, dict[str, Any]] = {}  # finished run records, read once
        self._exported: dict[tuple[str, tuple[str, ...]], float] = collections.defaultdict(float)
        self._registry: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rayloop-loop-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                self.poll()
                if self._failing:
                    logger.info("loop metrics: the registry answers again")
                self._failing = False
            except Exception as e:  # metrics must never take the replica down
                if not self._failing:
                    logger.warning("loop metrics: reading the registry failed (%s); retrying", e)
                self._failing = True
            if self._stop.wait(self.interval_s):
                return

    def poll(self) -> LoopSnapshot:
        if self._registry is None:
            from rayloop.registry import Registry

            self._registry = Registry.from_settings(self.settings)
        reg = self._registry
        snap = loop_snapshot(reg.rollouts(self.model), reg.list_versions(self.model, include_deleted=True))
        add_pipeline_runs(snap, self._pipeline_runs())
        self.export(snap)
        return snap

    def _pipeline_runs(self) -> list[dict[str, Any]]:
        import json

        from rayloop.storage import Storage

        st = Storage(self.settings.storage_root, s3_endpoint=self.settings.storage.s3_endpoint)
        prefix = f"pipelines/{self.model}/runs"
        if not st.exists(prefix):
            return []
        runs = []
        for key in sorted(k for k in st.list(prefix) if k.endswith(".json")):
            run = self._runs.get(key)
            if run is None:
                run = json.loads(st.read_bytes(key))
                if run.get("finished_at"):
                    self._runs[key] = run  # a finished run no longer changes
            runs.append(run)
        return runs

    def export(self, snap: LoopSnapshot) -> None:
        tags = {"model": self.model}
        self._gauges["active"].set(1.0 if snap.active else 0.0, tags=tags)
        self._gauges["step"].set(float(snap.step), tags=tags)
        self._gauges["weight"].set(snap.canary_weight, tags=tags)
        if snap.last_rollback is not None:
            self._gauges["last_rollback"].set(snap.last_rollback, tags=tags)
        if snap.last_run is not None:
            self._last_run.set(snap.last_run, tags=tags)
        for stage, seconds in snap.stage_seconds.items():
            self._stage_seconds.set(seconds, tags={**tags, "stage": stage})
        counts: dict[str, dict[tuple[str, ...], int]] = {
            "analysis": {(v,): n for v, n in snap.analysis.items()},
            "rollouts": {(s, st): n for (s, st), n in snap.rollouts.items()},
            "rollbacks": {(r,): n for r, n in snap.rollbacks.items()},
            "gate": {(d,): n for d, n in snap.gate.items()},
            "stages": {(st, status): n for (st, status), n in snap.stages.items()},
        }
        keys = {
            "analysis": ("verdict",),
            "rollouts": ("strategy", "status"),
            "rollbacks": ("reason",),
            "gate": ("decision",),
            "stages": ("stage", "status"),
        }
        for name, values in counts.items():
            for labels, total in values.items():
                delta = total - self._exported[(name, labels)]
                if delta > 0:
                    self._counters[name].inc(delta, tags={**tags, **dict(zip(keys[name], labels, strict=True))})
                    self._exported[(name, labels)] = float(total)
