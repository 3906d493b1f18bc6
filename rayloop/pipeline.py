"""One pipeline from collected interactions to a deployed version.

    collect -> preprocess -> retrain -> register -> evaluate -> deploy

Each run is identified by a hash of its inputs (model, base version, the files
in the interaction store, and the data/training/gate settings). Every stage
writes its output to ``pipelines/<model>/runs/<run_id>.json`` in storage as it
finishes, so re-running after a failure skips the stages already done for the
same inputs and resumes where it stopped. A candidate the gate rejects is
never deployed; production stays where it is.

    from rayloop.pipeline import run_pipeline
    record = run_pipeline(settings)          # or: rayloop pipeline run
    record["stages"]["evaluate"]["output"]["decision"]
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from rayloop.config import Settings
from rayloop.data.schema import FEEDBACK_DIR, INTERACTIONS_DIR
from rayloop.errors import DataError, RayloopError
from rayloop.registry.rollouts import RolloutRecord
from rayloop.storage import Storage

STAGES = ("collect", "preprocess", "retrain", "register", "evaluate", "deploy")
StageCallback = Callable[[str, str, dict[str, Any]], None]


# -- what each stage hands the next (persisted as JSON in the run record, read back on resume) ----------
class StageOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Snapshotted(StageOutput):
    snapshot_id: str
    uri: str
    counts: dict[str, int]


class Trained(StageOutput):
    model_dir: str
    train_loss: float
    eval_loss: float | None
    steps: int
    checkpoint_uri: str
    config: dict[str, Any]


class Registered(StageOutput):
    version: int
    ref: str
    fingerprint: str


class Evaluated(StageOutput):
    decision: Literal["accepted", "rejected"]
    reasons: list[str]
    candidate: dict[str, float]  # set -> accuracy
    production: dict[str, float]


class Deployed(StageOutput):
    strategy: str
    status: str | None
    rollout: RolloutRecord


class Skipped(StageOutput):
    reason: str


Out = TypeVar("Out", bound=StageOutput)


def _storage(settings: Settings) -> Storage:
    return Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)


def _listing(st: Storage, prefix: str) -> list[tuple[str, int]]:
    return sorted((k, st.size(k)) for k in st.list(prefix) if k.endswith(".parquet"))


def count_feedback(st: Storage, model: str | None = None) -> int:
    """Feedback rows in the store (for ``model`` when given)."""
    import pyarrow.dataset as pads

    files = [st.path(k) for k, _ in _listing(st, FEEDBACK_DIR)]
    if not files:
        return 0
    ds = pads.dataset(files, filesystem=st.fs, format="parquet")
    if model is None:
        return int(ds.count_rows())
    return int(ds.count_rows(filter=pads.field("model_name") == model))


def _run_key(settings: Settings, model: str, base_fingerprint: str, inputs: str) -> str:
    relevant = {
        "model": model,
        "base": base_fingerprint,
        "inputs": inputs,
        "data": settings.data.model_dump(mode="json"),
        "training": settings.training.model_dump(mode="json"),
        "gate": settings.gate.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class PipelineRun:
    """The persisted record of one run; stages are saved as they finish."""

    def __init__(self, st: Storage, model: str, run_id: str, record: dict[str, Any]) -> None:
        self.st, self.model, self.run_id, self.record = st, model, run_id, record

    @staticmethod
    def key(model: str, run_id: str) -> str:
        return f"pipelines/{model}/runs/{run_id}.json"

    @classmethod
    def open(cls, st: Storage, model: str, run_id: str, base: dict[str, Any]) -> PipelineRun:
        key = cls.key(model, run_id)
        if st.exists(key):
            record = json.loads(st.read_bytes(key))
        else:
            record = {"run_id": run_id, "model": model, "created_at": time.time(), "stages": {}, **base}
        return cls(st, model, run_id, record)

    def done(self, stage: str) -> dict[str, Any] | None:
        rec = self.record["stages"].get(stage)
        return rec["output"] if rec and rec["status"] in ("done", "skipped") else None

    def save_stage(
        self, stage: str, status: str, output: dict[str, Any], started: float, error: str | None = None
    ) -> None:
        self.record["stages"][stage] = {
            "status": status,
            "output": output,
            "started_at": started,
            "finished_at": time.time(),
            "seconds": round(time.time() - started, 2),
            "error": error,
        }
        self.save()

    def save(self) -> None:
        self.record["updated_at"] = time.time()
        self.st.write_bytes(self.key(self.model, self.run_id), json.dumps(self.record, indent=1, default=str).encode())


class Steps:
    """What each stage does; the real implementation. Tests pass another one to ``run_pipeline``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def preprocess(self, base_dir: Path, base: Any) -> Snapshotted:
        from rayloop.data.preprocess import preprocess
        from rayloop.data.replay import ReplaySource

        replay = ReplaySource.from_model_dir(base_dir)
        snap_id = (base.lineage or {}).get("snapshot_id") if isinstance(base.lineage, dict) else None
        if snap_id:
            replay = ReplaySource.from_snapshot(str(snap_id))
        info = preprocess(self.settings, model_dir=base_dir, model_name=self.settings.pipeline.model, replay=replay)
        return Snapshotted(snapshot_id=info.snapshot_id, uri=info.uri, counts=info.counts)

    def retrain(self, snapshot_id: str, base_dir: Path, output_dir: Path, base_ref: str | None = None) -> Trained:
        from rayloop.training.retrain import retrain

        res = retrain(
            self.settings, snapshot_id=snapshot_id, base_dir=base_dir, output_dir=output_dir, base_ref=base_ref
        )
        return Trained(
            model_dir=str(res.model_dir),
            train_loss=res.train_loss,
            eval_loss=res.eval_loss,
            steps=res.steps,
            checkpoint_uri=res.checkpoint_uri,
            config=res.config,
        )

    def register(self, trained: Trained, base: Any, snapshot_id: str) -> Registered:
        from rayloop.training.register import register_candidate
        from rayloop.training.retrain import RetrainResult

        res = RetrainResult(
            model_dir=Path(trained.model_dir),
            train_loss=trained.train_loss,
            eval_loss=trained.eval_loss,
            steps=trained.steps,
            checkpoint_uri=trained.checkpoint_uri,
            config=trained.config,
        )
        mv = register_candidate(
            self.settings, res, name=self.settings.pipeline.model, parent_version=base.version, snapshot_id=snapshot_id
        )
        return Registered(version=mv.version, ref=f"{mv.name}@{mv.version}", fingerprint=mv.fingerprint)

    def evaluate(self, candidate_ref: str, base_ref: str, snapshot_id: str) -> Evaluated:
        from rayloop.data.snapshot import eval_questions
        from rayloop.evaluation.evalset import EvalItem
        from rayloop.evaluation.gate import run_gate

        items = [EvalItem("eval_split", q, a, "exact", a) for q, a in eval_questions(self.settings, snapshot_id)]
        report = run_gate(
            self.settings, candidate_ref, against=base_ref, extra_sets={"eval_split": items} if items else {}
        )
        return Evaluated(
            decision=report.gate.decision,
            reasons=report.gate.reasons,
            candidate={k: v.accuracy for k, v in report.candidate.sets.items()},
            production={k: v.accuracy for k, v in report.production.sets.items()},
        )

    def deploy(self, candidate_ref: str, strategy: Any, deploy_kwargs: dict[str, Any]) -> Deployed:
        from rayloop.rollout.controller import deploy

        result = deploy(self.settings, candidate_ref, strategy, **deploy_kwargs)
        return Deployed(strategy=str(strategy), status=result.status, rollout=result)


def run_pipeline(
    settings: Settings,
    *,
    on_stage: StageCallback | None = None,
    deploy_kwargs: dict[str, Any] | None = None,
    steps: Steps | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline for ``settings.pipeline.model``; returns the run record."""
    from rayloop.registry import Registry

    cfg = settings.pipeline
    do = steps or Steps(settings)
    emit = on_stage or (lambda stage, status, info: None)
    st = _storage(settings)
    reg = Registry.from_settings(settings)
    base = reg.resolve(cfg.base or f"{cfg.model}@production")

    # collect: what is in the store decides the run id.
    t0 = time.time()
    emit("collect", "running", {})
    pruned: dict[str, int] = {}
    if settings.data.retention_days is not None:  # data past its retention age is never trained on
        from rayloop.data.governance import prune

        pruned = {table: len(parts) for table, parts in prune(settings).partitions.items()}
    listing: list[tuple[str, int | str]] = [*_listing(st, INTERACTIONS_DIR), *_listing(st, FEEDBACK_DIR)]
    if settings.data.external:  # a changed external file is a new input, even under the same path
        from rayloop.data.records import pairs_fingerprint, read_pairs

        s3 = settings.storage.s3_endpoint
        listing += [(e.path, pairs_fingerprint(read_pairs(e.path, s3_endpoint=s3))) for e in settings.data.external]
    inputs = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    n_feedback = count_feedback(st, cfg.model)
    if n_feedback < cfg.min_feedback:
        raise DataError(
            f"only {n_feedback} feedback rows for model {cfg.model!r} in {st.uri_of(FEEDBACK_DIR)}; "
            f"the pipeline needs at least {cfg.min_feedback} (pipeline.min_feedback)",
            hint="Collect more feedback through POST /v1/feedback, or lower pipeline.min_feedback.",
        )
    run_id = _run_key(settings, cfg.model, base.fingerprint, inputs)
    run = PipelineRun.open(st, cfg.model, run_id, {"base": base.ref, "base_version": base.version})
    collect_out = {
        "files": len(listing),
        "feedback_rows": n_feedback,
        "inputs_hash": inputs,
        "pruned_partitions": pruned,
    }
    if run.done("collect") is None:
        run.save_stage("collect", "done", collect_out, t0)
    emit("collect", "done", collect_out)

    def stage(name: str, kind: type[Out], fn: Callable[[], Out | Skipped]) -> Out | Skipped:
        prior = run.done(name)
        if prior is not None:
            emit(name, "reused", prior)
            skipped = run.record["stages"][name]["status"] == "skipped"
            return Skipped.model_validate(prior) if skipped else kind.model_validate(prior)
        started = time.time()
        emit(name, "running", {})
        try:
            out = fn()
        except RayloopError as e:
            run.save_stage(name, "failed", {}, started, error=f"{type(e).__name__}: {e.message}")
            emit(name, "failed", {"error": e.message})
            raise
        except Exception as e:
            run.save_stage(name, "failed", {}, started, error=f"{type(e).__name__}: {e}")
            emit(name, "failed", {"error": str(e)})
            raise
        status = "skipped" if isinstance(out, Skipped) else "done"
        dumped = out.model_dump(mode="json")
        run.save_stage(name, status, dumped, started)
        emit(name, status, dumped)
        return out

    def done(out: Out | Skipped) -> Out:
        assert not isinstance(out, Skipped)  # only deploy is ever skipped
        return out

    base_dir = reg.fetch(base.ref)
    snap = done(stage("preprocess", Snapshotted, lambda: do.preprocess(base_dir, base)))
    work = settings.home_path / "work" / run_id
    trained = done(
        stage("retrain", Trained, lambda: do.retrain(snap.snapshot_id, base_dir, work / "candidate", base.ref))
    )
    if run.done("register") is None and not Path(trained.model_dir).is_dir():
        # The trained files were local to a machine that is gone: train again.
        run.record["stages"].pop("retrain", None)
        trained = done(
            stage("retrain", Trained, lambda: do.retrain(snap.snapshot_id, base_dir, work / "candidate", base.ref))
        )
    cand = done(stage("register", Registered, lambda: do.register(trained, base, snap.snapshot_id)))
    verdict = done(stage("evaluate", Evaluated, lambda: do.evaluate(cand.ref, base.ref, snap.snapshot_id)))

    def deploy_stage() -> Deployed | Skipped:
        if verdict.decision != "accepted":
            return Skipped(reason="gate rejected the candidate: " + "; ".join(verdict.reasons))
        if not cfg.deploy:
            return Skipped(reason="pipeline.deploy is false")
        return do.deploy(cand.ref, cfg.strategy or settings.rollout.strategy, deploy_kwargs or {})

    stage("deploy", Deployed, deploy_stage)
    run.record["finished_at"] = time.time()
    run.save()
    return run.record


def watch(
    settings: Settings,
    *,
    on_stage: StageCallback | None = None,
    max_runs: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = print,
) -> int:
    """Run the pipeline whenever ``min_feedback`` new feedback rows have arrived since the last run,
    or, with ``run_every_s``, when that long has passed and any new feedback arrived."""
    cfg = settings.pipeline
    st = _storage(settings)
    runs = 0
    seen = 0
    last = clock()
    while max_runs is None or runs < max_runs:
        n = count_feedback(st, cfg.model)
        fresh = n - seen
        due = cfg.run_every_s is not None and clock() - last >= cfg.run_every_s and fresh > 0
        if fresh >= cfg.min_feedback or due:
            why = f"{fresh} new feedback rows" + (
                "" if fresh >= cfg.min_feedback else f" and {cfg.run_every_s:g}s passed"
            )
            log(f"pipeline: {why}; starting a run")
            try:
                run_pipeline(settings, on_stage=on_stage)
            except RayloopError as e:  # a watcher keeps watching; the run record keeps the failure
                log(f"pipeline: run failed: {type(e).__name__}: {e.message}")
            runs += 1
            seen, last = n, clock()
            if max_runs is not None and runs >= max_runs:
                break
        else:
            log(f"pipeline: {fresh} new feedback rows (< {cfg.min_feedback}); waiting")
        sleep(cfg.watch_interval_s)
    return runs
