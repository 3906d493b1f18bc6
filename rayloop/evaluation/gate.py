"""The validation gate: a candidate is compared with production before any rollout.

Both models answer the same evaluation sets greedily (vLLM, one engine per
Ray Data actor); the gate policy (:class:`rayloop.config.GateSettings`) then
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
    report["gate"]["decision"]   # "accepted" or "rejected"
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rayloop.config import GateSettings, Settings
from rayloop.errors import EvaluationError
from rayloop.evaluation.evalset import EvalItem

ACCEPTED, REJECTED = "accepted", "rejected"


def _rows(sets: dict[str, list[EvalItem]]) -> list[dict[str, Any]]:
    return [asdict(item) for items in sets.values() for item in items]


def _predict(model_dir: Path, rows: list[dict[str, Any]], settings: Settings, use_ray: bool) -> list[dict[str, Any]]:
    from rayloop.evaluation.inference import VLLMPredictor

    engine = settings.serving.engine.model_dump()
    kwargs = {"model_dir": str(model_dir), "engine": engine, "max_tokens": settings.gate.max_tokens}
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


def evaluate_model(
    model_dir: str | Path,
    sets: dict[str, list[EvalItem]],
    settings: Settings,
    *,
    use_ray: bool = True,
    label: str = "",
) -> dict[str, Any]:
    """Accuracy, loss and throughput of one model on every set."""
    rows = _rows(sets)
    if not rows:
        raise EvaluationError(
            "no evaluation items: the snapshot has no eval split and no fixed sets are stored",
            hint="Store a regression set (rayloop.evaluation.evalset.save_eval_set) or preprocess more data.",
        )
    t0 = time.perf_counter()
    results = _predict(Path(model_dir), rows, settings, use_ray)
    seconds = time.perf_counter() - t0
    by_set: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_set[str(r["set"])].append(r)
    report_sets: dict[str, Any] = {}
    for name, rs in by_set.items():
        items = [EvalItem(**{k: r[k] for k in ("set", "prompt", "reference", "match", "target")}) for r in rs]
        correct = [it.is_correct(str(r["output"])) for it, r in zip(items, rs, strict=True)]
        nlls = [float(r["nll"]) for r in rs if r.get("nll") is not None and not math.isnan(float(r["nll"]))]
        report_sets[name] = {
            "n": len(rs),
            "correct": sum(correct),
            "accuracy": sum(correct) / len(rs),
            "loss": sum(nlls) / len(nlls) if nlls else None,
            "perplexity": math.exp(sum(nlls) / len(nlls)) if nlls else None,
            "failures": [
                {"prompt": r["prompt"], "expected": r["reference"], "output": r["output"]}
                for r, ok in zip(rs, correct, strict=True)
                if not ok
            ][:5],
        }
    return {
        "model": label,
        "model_dir": str(model_dir),
        "sets": report_sets,
        "items": len(rows),
        "seconds": round(seconds, 2),
        "items_per_s": round(len(rows) / seconds, 2) if seconds else None,
    }


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
    decision = ACCEPTED if not reasons else REJECTED
    if decision == ACCEPTED:
        reasons.append("all gate checks passed")
    return {"decision": decision, "reasons": reasons, "checks": checks, "policy": policy.model_dump()}


def run_gate(
    settings: Settings,
    candidate: str,
    *,
    against: str | None = None,
    extra_sets: dict[str, list[EvalItem]] | None = None,
    use_ray: bool = True,
    record: bool = True,
    actor: str = "gate",
) -> dict[str, Any]:
    """Evaluate ``candidate`` against ``against`` (default: NAME@production) and record the decision."""
    from rayloop.evaluation.evalset import load_eval_sets
    from rayloop.registry import Registry
    from rayloop.storage import Storage

    reg = Registry.from_settings(settings)
    cand = reg.resolve(candidate)
    prod = reg.resolve(against or f"{cand.name}@production")
    storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
    sets = load_eval_sets(storage, cand.name)
    sets.update(extra_sets or {})
    jobs = [(reg.fetch(f"{mv.name}@{mv.version}"), f"{mv.name}@{mv.version}") for mv in (cand, prod)]
    if use_ray:
        # Both models at once, each in its own Ray Data actor: engine start-up dominates on small
        # eval sets and overlaps, and both are measured under the same conditions.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="gate-eval") as pool:
            futures = [pool.submit(evaluate_model, d, sets, settings, use_ray=True, label=lbl) for d, lbl in jobs]
            cand_report, prod_report = (f.result() for f in futures)
    else:
        cand_report, prod_report = (evaluate_model(d, sets, settings, use_ray=False, label=lbl) for d, lbl in jobs)
    gate = decide(cand_report, prod_report, settings.gate)
    report = {
        "candidate": cand_report,
        "production": prod_report,
        "gate": gate,
        "evaluated_at": time.time(),
    }
    if record:
        reg.annotate(f"{cand.name}@{cand.version}", "evaluation", report, actor=actor)
        reg.annotate(
            f"{cand.name}@{cand.version}",
            "gate",
            {"decision": gate["decision"], "reasons": gate["reasons"], "against": prod.version},
            actor=actor,
        )
    return report
