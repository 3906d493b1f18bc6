"""The pipeline's stage bookkeeping: resume after failure, skip deploy on rejection.

The stages' real work (Ray Data, DeepSpeed, vLLM) is replaced by a recording
``Steps`` passed to ``run_pipeline``; the registry, storage and run records are real.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayloop.config import Settings
from rayloop.data.schema import FEEDBACK_SCHEMA, feedback_partition
from rayloop.errors import DataError
from rayloop.pipeline import (
    Deployed,
    Evaluated,
    PipelineRun,
    Registered,
    Snapshotted,
    Steps,
    Trained,
    count_feedback,
    run_pipeline,
)
from rayloop.registry import Registry
from rayloop.storage import Storage
from tests.registry_util import finished_rollout, make_model_dir


class RecordingSteps(Steps):
    def __init__(self, settings: Settings, *, fail_retrain: int = 0, decision: str = "accepted") -> None:
        super().__init__(settings)
        self.calls: list[str] = []
        self.fail_retrain = fail_retrain
        self.decision = decision

    def preprocess(self, base_dir: Path, base: Any) -> Snapshotted:
        self.calls.append("preprocess")
        assert (base_dir / "config.json").is_file()
        return Snapshotted(snapshot_id="snap1", uri="mem://", counts={"train": 10})

    def retrain(self, snapshot_id: str, base_dir: Path, output_dir: Path, base_ref: str | None = None) -> Trained:
        self.calls.append("retrain")
        if self.fail_retrain:
            self.fail_retrain -= 1
            raise RuntimeError("worker died")
        make_model_dir(output_dir, seed=1)
        return Trained(model_dir=str(output_dir), train_loss=0.1, eval_loss=0.2, steps=5, checkpoint_uri="", config={})

    def register(self, trained: Trained, base: Any, snapshot_id: str) -> Registered:
        self.calls.append("register")
        mv = Registry.from_settings(self.settings).register("demo", trained.model_dir, parent=base.version)
        return Registered(version=mv.version, ref=mv.ref, fingerprint=mv.fingerprint)

    def evaluate(self, candidate_ref: str, base_ref: str, snapshot_id: str) -> Evaluated:
        self.calls.append("evaluate")
        return Evaluated(decision=self.decision, reasons=["test"], candidate={}, production={})  # type: ignore[arg-type]

    def deploy(self, candidate_ref: str, strategy: Any, deploy_kwargs: dict[str, Any]) -> Deployed:
        self.calls.append("deploy")
        version = int(candidate_ref.rpartition("@")[2])
        record = finished_rollout(from_version=version - 1, to_version=version, strategy=str(strategy))
        return Deployed(strategy=str(strategy), status=record.status, rollout=record)


def _feedback(settings: Settings, n: int, model: str = "demo") -> None:
    st = Storage(settings.storage_root)
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "request_id": f"r{i}",
            "timestamp": now,
            "rating": -1,
            "correction": "x",
            "user_id": "u",
            "model_name": model,
            "model_version": 1,
        }
        for i in range(n)
    ]
    table = pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA)
    key = f"{feedback_partition(now.date().isoformat())}/part-{model}-{n}.parquet"
    st.makedirs(key.rsplit("/", 1)[0])
    pq.write_table(table, st.path(key), filesystem=st.fs)


@pytest.fixture
def base(settings: Settings, tmp_path: Path) -> Registry:
    reg = Registry.from_settings(settings)
    mv = reg.register("demo", make_model_dir(tmp_path / "base"))
    reg.set_alias("demo", "production", mv.version)
    return reg


def test_too_little_feedback_is_a_clear_error(settings: Settings, base: Registry) -> None:
    _feedback(settings, 3)
    with pytest.raises(DataError, match=r"only 3 feedback rows for model 'demo'.*at least 20"):
        run_pipeline(settings, steps=RecordingSteps(settings))


def test_resume_skips_finished_stages(settings: Settings, base: Registry) -> None:
    _feedback(settings, 25)
    _feedback(settings, 7, model="other")
    assert count_feedback(Storage(settings.storage_root), "demo") == 25
    steps = RecordingSteps(settings, fail_retrain=1)
    with pytest.raises(RuntimeError, match="worker died"):
        run_pipeline(settings, steps=steps)
    assert steps.calls == ["preprocess", "retrain"]

    seen: list[tuple[str, str]] = []
    record = run_pipeline(settings, steps=steps, on_stage=lambda s, status, _: seen.append((s, status)))
    assert steps.calls == ["preprocess", "retrain", "retrain", "register", "evaluate", "deploy"]
    assert ("preprocess", "reused") in seen
    assert {k: v["status"] for k, v in record["stages"].items()} == dict.fromkeys(
        ("collect", "preprocess", "retrain", "register", "evaluate", "deploy"), "done"
    )
    assert record["stages"]["register"]["output"]["ref"] == "demo@2"
    stored = PipelineRun.open(Storage(settings.storage_root), "demo", record["run_id"], {}).record
    assert stored["stages"]["deploy"]["status"] == "done"

    # Same inputs again: nothing is redone, no second candidate is registered.
    again = RecordingSteps(settings)
    run_pipeline(settings, steps=again)
    assert again.calls == []
    assert [v.version for v in base.list_versions("demo")] == [1, 2]

    # New feedback makes a new run.
    _feedback(settings, 30)
    fresh = RecordingSteps(settings)
    assert run_pipeline(settings, steps=fresh)["run_id"] != record["run_id"]
    assert fresh.calls[0] == "preprocess"


def test_rejected_candidate_is_never_deployed(settings: Settings, base: Registry) -> None:
    _feedback(settings, 25)
    steps = RecordingSteps(settings, decision="rejected")
    record = run_pipeline(settings, steps=steps)
    assert "deploy" not in steps.calls
    assert record["stages"]["deploy"]["status"] == "skipped"
    assert "gate rejected" in record["stages"]["deploy"]["output"]["reason"]
    assert base.get_alias("demo", "production") == 1


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _watch(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, counts: list[int], fail: bool = False, **overrides: Any
) -> list[Any]:
    """Run ``watch`` with feedback counts ``counts`` (one per check) and a fake clock.

    Returns the log lines and ``("run", time)`` for each pipeline run; ``fail``: every run raises.
    """
    import rayloop.pipeline as pl

    cfg = settings.model_copy(deep=True)
    for k, v in overrides.items():
        setattr(cfg.pipeline, k, v)
    clock = _Clock()
    seq = iter(counts)
    events: list[Any] = []
    monkeypatch.setattr(pl, "count_feedback", lambda st, model=None: next(seq))

    def fake_run(s: Settings, on_stage: Any = None) -> dict[str, Any]:
        events.append(("run", clock.now))
        if fail:
            raise DataError("nothing to train on")
        return {}

    monkeypatch.setattr(pl, "run_pipeline", fake_run)

    def sleep(s: float) -> None:
        clock.now += s

    try:
        pl.watch(cfg, sleep=sleep, clock=clock, log=events.append)
    except StopIteration:  # the fake feedback counts ran out
        pass
    return events


def test_watch_runs_when_enough_new_feedback_arrived(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    ev = _watch(settings, monkeypatch, [5, 25, 30, 44, 60], min_feedback=20, watch_interval_s=10)
    # 25 >= 20 -> run at t=10; then 5 and 19 new are too few; 35 new at t=40 -> run.
    assert [e for e in ev if isinstance(e, tuple)] == [("run", 10.0), ("run", 40.0)]
    assert "pipeline: 5 new feedback rows (< 20); waiting" in ev


def test_watch_also_runs_on_its_interval_when_any_feedback_arrived(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = _watch(settings, monkeypatch, [0, 3, 3, 3, 4, 4], min_feedback=20, watch_interval_s=10, run_every_s=25)
    # Below the threshold all along: at t=30 the interval has passed with 3 new rows -> run;
    # at t=40/50 one more row arrived but the next interval has not passed.
    assert [e for e in ev if isinstance(e, tuple)] == [("run", 30.0)]
    assert "pipeline: 3 new feedback rows and 25s passed; starting a run" in ev


def test_watch_keeps_watching_after_a_failed_run(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    ev = _watch(settings, monkeypatch, [30, 30, 70], min_feedback=20, watch_interval_s=10, fail=True)
    assert [e for e in ev if isinstance(e, tuple)] == [("run", 0.0), ("run", 20.0)]
    assert "pipeline: run failed: DataError: nothing to train on" in ev


def test_pipeline_runs_become_stage_metrics(settings: Settings, base: Registry) -> None:
    """The serving replicas' loop exporter reads the run records: stage outcomes over all runs, the latest
    run's stage durations (rayloop.monitoring.loop)."""
    from rayloop.monitoring.loop import LoopExporter
    from tests.unit.test_monitoring import _FakeMetrics, _value

    _feedback(settings, 25)
    run_pipeline(settings, steps=RecordingSteps(settings))
    _feedback(settings, 30)
    record = run_pipeline(settings, steps=RecordingSteps(settings, decision="rejected"))
    exporter = LoopExporter(settings, "demo", interval_s=60, metrics=_FakeMetrics)
    snap = exporter.poll()
    assert snap.stages[("deploy", "done")] == 1 and snap.stages[("deploy", "skipped")] == 1
    assert snap.stages[("evaluate", "done")] == 2
    assert _value(exporter._counters["stages"], model="demo", stage="deploy", status="skipped") == 1.0
    seconds = _value(exporter._stage_seconds, model="demo", stage="evaluate")
    assert seconds == record["stages"]["evaluate"]["seconds"], "the latest run's duration"
    assert _value(exporter._last_run, model="demo") == record["updated_at"]
