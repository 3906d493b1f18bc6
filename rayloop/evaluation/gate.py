"""The validation gate: a candidate is compared with production before any rollout.

Both models answer the same evaluation sets greedily with one vLLM engine on
a Ray Data actor (production's weights are swapped in after the candidate's,
see :mod:`rayloop.evaluation.inference`); the gate policy (:class:`rayloop.config.GateSettings`) then
decides:

- the mean accuracy over the ``improve_on`` sets must rise by at least
  ``min_improvement``;
- no ``protect`` set may drop by more than ``max_regression``;
- every golden prompt must pass (``require_golden``).

The report (per-set accuracy, loss, throughput, sample outputs) and the
decision are stored on the candidate in the registry; the rollout controller
refuses candidates whose decision is not ``accepted``.

    from rayloop.evaluation.gate import run_gate
    report = run_gate(settings, "demo@candidate", against="demo@production")
    report.gate.decision   # "accepted" or "rejected"; report.candidate.sets["new_facts"].accuracy
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from rayloop.config import GateSettings, Settings
from rayloop.errors import EvaluationError
from rayloop.evaluation.evalset import EvalItem

ACCEPTED, REJECTED = "accepted", "rejected"


def _rows(sets: dict[str, list[EvalItem]]) -> list[dict[str, Any]]:
    return [asdict(item) for items in sets.values() for item in items]


def _predict(
    model_dirs: list[Path],
    rows: list[dict[str, Any]],
    settings: Settings,
    use_ray: bool,
    golden: list[dict[str, Any] | None],
    refs: list[str | None] | None = None,
) -> list[dict[str, Any]]:
    from rayloop.evaluation.inference import VLLMPredictor

    engine = settings.serving.engine.model_dump()
    kwargs = {
        "model_dir": [str(d) for d in model_dirs],
        "engine": engine,
        "max_tokens": settings.gate.max_tokens,
        "golden": golden,
        "refs": refs,
        "node_settings": settings.dump(),
    }
    if not use_ray:
        p = VLLMPredictor(**kwargs)  # type: ignore[arg-type]
        try:
            batch = {k: [r[k] for r in rows] for k in rows[0]}
            out = p(batch)
            return [{k: out[k][i] for k in out} for i in range(len(rows))]
        finally:
            p.close()

    import ray.data

    ds = ray.data.from_items(rows).map_batches(
        VLLMPredictor,
        fn_constructor_kwargs=kwargs,
        batch_size=max(1, len(rows)),
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=settings.gate.eval_num_cpus,
        batch_format="default",
    )
    return list(ds.take_all())


def _report(results: list[dict[str, Any]], i: int, model_dir: Path, label: str) -> dict[str, Any]:
    by_set: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_set[str(r["set"])].append(r)
    report_sets: dict[str, Any] = {}
    for name, rs in by_set.items():
        items = [EvalItem(**{k: r[k] for k in ("set", "prompt", "reference", "match", "target")}) for r in rs]
        outputs = [str(r[f"output_{i}"]) for r in rs]
        correct = [it.is_correct(o) for it, o in zip(items, outputs, strict=True)]
        nlls = [v for v in (float(r[f"nll_{i}"]) for r in rs) if not math.isnan(v)]
        report_sets[name] = {
            "n": len(rs),
            "correct": sum(correct),
            "accuracy": sum(correct) / len(rs),
            "loss": sum(nlls) / len(nlls) if nlls else None,
            "perplexity": math.exp(sum(nlls) / len(nlls)) if nlls else None,
            "failures": [
                {"prompt": r["prompt"], "expected": r["reference"], "output": o}
                for r, o, ok in zip(rs, outputs, correct, strict=True)
                if not ok
            ][:5],
        }
    seconds = sum(float(r[f"seconds_{i}"]) for r in results)
    return {
        "model": label,
        "model_dir": str(model_dir),
        "sets": report_sets,
        "items": len(results),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(results) / seconds, 2) if seconds else None,
        # How this version got into the evaluation engine (fresh, or swapped in place and verified).
        "engine": max((json.loads(r[f"load_{i}"]) for r in results), key=len),
    }


def evaluate_models(
    model_dirs: list[str | Path],
    sets: dict[str, list[EvalItem]],
    settings: Settings,
    *,
    use_ray: bool = True,
    labels: list[str] | None = None,
    golden: list[dict[str, Any] | None] | None = None,
    refs: list[str | None] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy, loss and throughput of each model on every set, all answered by one vLLM engine.

    ``golden`` (per model, optional) are a fresh engine's answers to the golden prompts; a model with
    them is swapped into the engine in place and checked against them, else it gets a fresh engine.
    ``refs`` (per model, optional) name registered versions: the engine, wherever Ray places it, fetches
    one from the registry when its directory is not on that node.
    """
    rows = _rows(sets)
    if not rows:
        raise EvaluationError(
            "no evaluation items: the snapshot has no eval split and no fixed sets are stored",
            hint="Store a regression set (rayloop.evaluation.evalset.save_eval_set) or preprocess more data.",
        )
    dirs = [Path(d) for d in model_dirs]
    names = labels or [""] * len(dirs)
    results = _predict(dirs, rows, settings, use_ray, golden or [None] * len(dirs), refs)
    return [_report(results, i, d, names[i]) for i, d in enumerate(dirs)]


def _mean_acc(report: dict[str, Any], names: list[str]) -> float | None:
    accs = [report["sets"][n]["accuracy"] for n in names if n in report["sets"]]
    return sum(accs) / len(accs) if accs else None


def decide(candidate: dict[str, Any], production: dict[str, Any], policy: GateSettings) -> dict[str, Any]:
    """Apply the gate policy to two evaluation reports."""
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    present = [n for n in policy.improve_on if n in candidate["sets"] and n in production["sets"]]
    if not present:
        reasons.append(f"none of the improvement sets {policy.improve_on} was evaluated")
    else:
        c, p = _mean_acc(candidate, present), _mean_acc(production, present)
        assert c is not None and p is not None
        ok = c - p >= policy.min_improvement
        checks.append(
            {"check": "improvement", "sets": present, "candidate": c, "production": p, "delta": c - p, "ok": ok}
        )
        if not ok:
            reasons.append(
                f"accuracy on {', '.join(present)} moved {p:.2f} -> {c:.2f} ({c - p:+.2f}); the gate needs +{policy.min_improvement:.2f}"
            )
    for name in policy.protect:
        if name in candidate["sets"] and name in production["sets"]:
            c = candidate["sets"][name]["accuracy"]
            p = production["sets"][name]["accuracy"]
            ok = p - c <= policy.max_regression
            checks.append(
                {"check": "regression", "set": name, "candidate": c, "production": p, "delta": c - p, "ok": ok}
            )
            if not ok:
                reasons.append(f"{name} regressed {p:.2f} -> {c:.2f}; at most -{policy.max_regression:.2f} is allowed")
    if policy.require_golden and "golden" in candidate["sets"]:
        g = candidate["sets"]["golden"]
        ok = g["correct"] == g["n"]
        checks.append({"check": "golden", "passed": g["correct"], "total": g["n"], "ok": ok})
        if not ok:
            reasons.append(f"{g['n'] - g['correct']} of {g['n']} golden prompts failed")
    # Never accept on data users wrote alone: a set from the operator (stored, a gate.eval_sets file, the
    # golden prompts) must take part in a passing check.
    from rayloop.evaluation.evalset import FEEDBACK_SETS

    def operator_sets(check: dict[str, Any]) -> set[str]:
        names = set(check.get("sets", [])) | ({check["set"]} if "set" in check else set())
        if check["check"] == "golden":
            names.add("golden")
        return names - FEEDBACK_SETS

    if not any(c["ok"] and operator_sets(c) for c in checks):
        reasons.append(
            "no evaluation set users cannot write (a regression, golden or held-out set stored under evalsets/ "
            "or named in gate.eval_sets) passed a check: the candidate was judged only on data drawn from "
            "feedback, which users could have steered"
        )
    decision = ACCEPTED if not reasons else REJECTED
    if decision == ACCEPTED:
        reasons.append("all gate checks passed")
    return {"decision": decision, "reasons": reasons, "checks": checks, "policy": policy.model_dump()}


def _golden_answers(storage: Any, fingerprint: str, settings: Settings) -> dict[str, Any] | None:
    from rayloop.serving import golden

    rec = golden.load_golden(storage, fingerprint, settings.serving.engine)
    if rec is None:
        return None
    return {"prompts": rec.prompts, "outputs": rec.outputs, "max_tokens": golden.MAX_TOKENS}


class SetScore(BaseModel):
    """One model on one evaluation set."""

    n: int
    correct: int
    accuracy: float
    loss: float | None = Field(default=None, description="Mean target NLL per token (None: no targets).")
    perplexity: float | None = None
    failures: list[dict[str, Any]] = Field(default_factory=list, description="Up to 5 wrong answers.")


class EvalReport(BaseModel):
    """One model's evaluation: a score per set, and how its weights got into the engine."""

    model: str
    model_dir: str
    sets: dict[str, SetScore]
    items: int
    seconds: float
    items_per_s: float | None = None
    engine: list[dict[str, Any]] = Field(default_factory=list, description="Loads: fresh, or swapped in place.")


class GateDecision(BaseModel):
    """The gate's verdict with the checks behind it and the policy applied."""

    decision: Literal["accepted", "rejected"]
    reasons: list[str]
    checks: list[dict[str, Any]]
    policy: dict[str, Any]


class GateReport(BaseModel):
    """What :func:`run_gate` returns (and stores on the candidate as its ``evaluation`` annotation)."""

    candidate: EvalReport
    production: EvalReport
    gate: GateDecision
    evaluated_at: float

    @property
    def accepted(self) -> bool:
        return self.gate.decision == ACCEPTED

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def run_gate(
    settings: Settings,
    candidate: str,
    *,
    against: str | None = None,
    extra_sets: dict[str, list[EvalItem]] | None = None,
    use_ray: bool = True,
    record: bool = True,
    actor: str = "gate",
) -> GateReport:
    """Evaluate ``candidate`` against ``against`` (default: NAME@production) and record the decision."""
    from rayloop.evaluation.evalset import load_eval_set_files, load_eval_sets
    from rayloop.registry import Registry
    from rayloop.storage import Storage

    reg = Registry.from_settings(settings)
    cand = reg.resolve(candidate)
    prod = reg.resolve(against or f"{cand.name}@production")
    storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
    sets = load_eval_sets(storage, cand.name)
    sets.update(load_eval_set_files(settings.gate.eval_sets, settings.storage.s3_endpoint))
    sets.update(extra_sets or {})
    # The candidate first, on a fresh engine; production is then swapped into the same engine when a
    # fresh engine's golden answers for it are on record (it was served), and checked against them.
    versions = [cand, prod]
    cand_report, prod_report = evaluate_models(
        [reg.fetch(f"{mv.name}@{mv.version}") for mv in versions],
        sets,
        settings,
        use_ray=use_ray,
        labels=[f"{mv.name}@{mv.version}" for mv in versions],
        golden=[_golden_answers(storage, mv.fingerprint, settings) for mv in versions],
        refs=[mv.ref for mv in versions],
    )
    report = GateReport(
        candidate=EvalReport.model_validate(cand_report),
        production=EvalReport.model_validate(prod_report),
        gate=GateDecision.model_validate(decide(cand_report, prod_report, settings.gate)),
        evaluated_at=time.time(),
    )
    if record:
        ref = f"{cand.name}@{cand.version}"
        reg.annotate(ref, "evaluation", report.to_json(), actor=actor)
        verdict = {"decision": report.gate.decision, "reasons": report.gate.reasons, "against": prod.version}
        reg.annotate(ref, "gate", verdict, actor=actor)
    return report
