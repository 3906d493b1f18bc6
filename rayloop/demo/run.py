"""``rayloop demo``: the whole loop on the embedded default.

1. build the base model v1 and register it as ``demo@production``;
2. serve it (Ray Serve + vLLM) and let simulated users ask about facts it has
   never seen, correcting its wrong answers through ``/v1/feedback``;
3. run the pipeline: preprocess (Ray Data), retrain (Ray Train + DeepSpeed),
   register, evaluate against production, gate;
4. roll the candidate out with a canary under live simulated traffic;
5. print and save a summary (``$RAYLOOP_HOME/demo-summary.json``);
6. leave the endpoint up until ``rayloop down``.

With ``poison=True`` users "correct" answers with wrong facts; the gate must
reject the candidate and production must stay on v1.
"""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

from rayloop.config import Settings
from rayloop.demo.setup import init_base_model, save_demo_eval_sets
from rayloop.demo.traffic import Traffic
from rayloop.demo.world import UserSimulator, World

MODEL = "demo"
# Seconds between rounds of simulated users while a canary engine starts (then: no pause).
WARMUP_PAUSE_S = 1.0


class _Out:
    def __init__(self, quiet: bool, file: TextIO | None = None) -> None:
        from rich.console import Console

        self.console = Console(quiet=quiet, highlight=False, file=file)

    def step(self, n: int, text: str) -> None:
        self.console.print(f"[bold cyan]\\[{n}/6][/] {text}")

    def info(self, text: str) -> None:
        self.console.print(f"      {text}")


def _ensure_cluster(settings: Settings, out: _Out) -> str | None:
    from rayloop import cluster

    if settings.ray.address:
        out.info(f"attaching to the Ray cluster at {settings.ray.address}")
        cluster.connect(settings)
        return None
    state = cluster.up(settings)
    out.info(f"Ray head (pid {state.pid}) at {state.address}; dashboard {state.dashboard_url}")
    cluster.connect(settings)
    return state.dashboard_url


def _register_base(settings: Settings, out: _Out) -> tuple[World, int]:
    from rayloop.registry import Registry

    info = init_base_model(settings, show_progress=not out.console.quiet, console=out.console)
    world = World.from_json((settings.home_path / "base-model" / "world.json").read_text())
    reg = Registry.from_settings(settings)
    current = reg.get_alias(MODEL, "production") if MODEL in reg.list_models() else None
    if current is None:
        mv = reg.register(
            MODEL, info["model_dir"], metadata={"origin": "rayloop init", "build": info.get("spec")}, actor="demo"
        )
        reg.set_alias(MODEL, "production", mv.version, actor="demo", reason="base model")
        current = mv.version
        out.info(f"registered the base model as {MODEL}@{mv.version} (production)")
    else:
        out.info(f"{MODEL}@production is v{current}")
    save_demo_eval_sets(settings, info["model_dir"], MODEL)
    return world, current


def run_demo(
    settings: Settings,
    *,
    poison: bool = False,
    quiet: bool = False,
    repeats: int = 2,
    canary_steps: list[int] | None = None,
    canary_interval_s: float = 10.0,
    console_file: TextIO | None = None,
) -> dict[str, Any]:
    """Run the loop; returns the summary also written to ``$RAYLOOP_HOME/demo-summary.json``. Progress goes
    to ``console_file`` (default stdout) unless ``quiet``."""
    import httpx

    from rayloop.pipeline import run_pipeline
    from rayloop.registry import Registry
    from rayloop.rollout.controller import deploy

    t0 = time.monotonic()
    out = _Out(quiet, console_file)
    settings.pipeline.model = MODEL
    out.step(1, "base model v1" + (" (poisoned feedback run)" if poison else ""))
    dashboard = _ensure_cluster(settings, out)
    world, v1 = _register_base(settings, out)

    out.step(2, f"serving {MODEL}@production and simulating users")
    t_serve = time.monotonic()
    deployed = deploy(settings, f"{MODEL}@production", "rolling")
    url = settings.serving.base_url
    out.info(
        f"{url}/v1/chat/completions answers as {MODEL}@{deployed.to_version} "
        f"({time.monotonic() - t_serve:.0f}s to deploy, rollout {deployed.status})"
    )
    sim = UserSimulator(world, seed=7)
    traffic = Traffic(url, MODEL, sim, poison=poison)
    before = traffic.run(sim.covering_requests(repeats=repeats)).to_json()
    httpx.post(f"{url}/rayloop/flush", timeout=60)
    out.info(
        f"{before['requests']} requests ({before['failed_requests']} failed), {before['feedback_sent']} feedback rows"
        + (" with WRONG corrections" if poison else "")
    )

    out.step(3, "pipeline: preprocess -> retrain (DeepSpeed) -> register -> evaluate -> gate")
    live: dict[str, Any] = {}

    def on_stage(stage: str, status: str, info: dict[str, Any]) -> None:
        detail = ""
        if stage == "preprocess" and status in ("done", "reused"):
            detail = f"snapshot {info['snapshot_id'][:12]} {info.get('counts', {})}"
        elif stage == "retrain" and status in ("done", "reused"):
            detail = f"{info['steps']} steps, train loss {info['train_loss']:.3f}"
        elif stage == "register" and status in ("done", "reused"):
            detail = f"candidate {info['ref']}"
        elif stage == "evaluate" and status in ("done", "reused"):
            detail = f"{info['decision']}: {'; '.join(info['reasons'])}"
            live["accepted"] = info["decision"] == "accepted"
        elif stage == "deploy" and status == "running" and live.get("accepted"):
            out.step(4, "canary rollout under live simulated traffic")
            live["t"] = Traffic(url, MODEL, UserSimulator(world, seed=11))
            # Light load while the canary's engine starts (it shares the CPUs), full load once it serves.
            live["t"].start(pause_s=WARMUP_PAUSE_S)
        elif status == "failed":
            detail = info.get("error", "")
        out.info(f"{stage}: {status} {detail}".rstrip())

    def on_rollout_event(event: dict[str, Any]) -> None:
        if event.get("event") == "slot_ready" and "t" in live:
            live["t"].pace(0.0)

    steps = canary_steps or [25, 50, 100]
    try:
        record = run_pipeline(
            settings,
            on_stage=on_stage,
            deploy_kwargs={"steps": steps, "interval_s": canary_interval_s, "on_event": on_rollout_event},
        )
    finally:
        rollout_traffic = live["t"].stop().to_json() if "t" in live else None
    if "t" not in live:
        out.step(4, "no rollout: the gate rejected the candidate")

    reg = Registry.from_settings(settings)
    cand_ref = record["stages"]["register"]["output"]["ref"]
    evaluation = reg.resolve(cand_ref).annotations.get("evaluation", {})
    gate = reg.resolve(cand_ref).annotations.get("gate", {})
    deploy_out = record["stages"]["deploy"]["output"]
    production = reg.get_alias(MODEL, "production")

    def acc(report: dict[str, Any], version: int) -> dict[str, Any]:
        sets = report.get("sets", {})
        return {
            "version": version,
            "new_accuracy": sets.get("new_facts", {}).get("accuracy"),
            "known_accuracy": sets.get("known_facts", {}).get("accuracy"),
            "eval_split_accuracy": sets.get("eval_split", {}).get("accuracy"),
        }

    rollout = deploy_out.get("rollout") or {}
    summary: dict[str, Any] = {
        "poison": poison,
        "baseline": acc(evaluation.get("production", {}), v1),
        "candidate": acc(evaluation.get("candidate", {}), record["stages"]["register"]["output"]["version"]),
        "gate": {"decision": gate.get("decision"), "reasons": gate.get("reasons", [])},
        "rollout": {
            "strategy": deploy_out.get("strategy"),
            "status": rollout.get("status", deploy_out.get("reason")),
            "steps": steps if rollout else [],
            "timeline": rollout.get("timeline", rollout.get("history", [])),
            "requests": (rollout_traffic or {}).get("requests", 0),
            "failed_requests": (rollout_traffic or {}).get("failed_requests", 0),
            "by_version": (rollout_traffic or {}).get("by_version", {}),
        },
        "traffic_before": before,
        "production_version": production,
        "pipeline_run": record["run_id"],
        "endpoint": url,
        "try_question": world.eval_questions("new")[0].prompt,
        "dashboard": dashboard,
        "duration_s": round(time.monotonic() - t0, 1),
    }
    from rayloop.monitoring.report import build_report

    summary["report"] = str(build_report(settings, MODEL, settings.home_path / "reports" / MODEL))
    path = settings.home_path / "demo-summary.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    _print_summary(out, summary, path)
    return summary


def _print_summary(out: _Out, s: dict[str, Any], path: Any) -> None:
    from rich.table import Table

    out.step(5, "summary")
    t = Table("", "version", "new facts (held out)", "known facts")

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    for label in ("baseline", "candidate"):
        r = s[label]
        t.add_row(label, f"v{r['version']}", pct(r["new_accuracy"]), pct(r["known_accuracy"]))
    out.console.print(t)
    out.info(f"gate: {s['gate']['decision']} ({'; '.join(s['gate']['reasons'])})")
    ro = s["rollout"]
    if ro["strategy"]:
        out.info(
            f"rollout: {ro['strategy']} {ro['steps']} -> {ro['status']}; {ro['requests']} live requests, {ro['failed_requests']} failed"
        )
    out.info(f"production is now {MODEL}@{s['production_version']}; took {s['duration_s']:.0f}s; summary in {path}")
    out.info(f"report (open in a browser): {s['report']}")
    out.step(6, "try it (the endpoint stays up until `rayloop down`)")
    q = s["try_question"]
    out.info(
        f"curl -s {s['endpoint']}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{q}"}}]}}\''
    )
    if s.get("dashboard"):
        out.info(f"dashboard: {s['dashboard']}  lineage: rayloop models lineage {MODEL}@{s['candidate']['version']}")
    out.info("web console (versions, lineage, rollouts with live traffic): rayloop console")
