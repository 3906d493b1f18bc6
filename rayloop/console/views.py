"""What each console page shows, assembled from the registry and ``rayloop status`` (no HTML here).

Every number a page shows comes from the same places the CLI reads: the registry (versions, aliases,
lineage, gate reports, rollouts and their timelines) and :func:`rayloop.rollout.controller.status` (what
Serve runs now, the route table's weights, live per-slot windows during a rollout, capture health). The
browser test compares the pages with ``rayloop status --json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rayloop.monitoring.loop import VERDICT_EVENTS, rollback_reason
from rayloop.monitoring.report import traffic_timeline, verdicts
from rayloop.registry import ModelVersion, Registry, RolloutRecord

MAX_ROLLOUTS = 10
LIVE_METRICS = ("p95_ms", "error_rate", "mean_rating")


@dataclass
class Weight:
    """One slot's share of a model's traffic."""

    slot: str
    version: int
    percent: float
    mirrored: bool = False  # shadow: a share of answered requests copied to it, not users' traffic


def weights(serve: dict[str, Any] | None) -> list[Weight]:
    """Traffic per slot from the app's summary in ``status()["serve"]`` (the route table Serve applies)."""
    if not serve:
        return []
    slots = serve.get("slots") or {}
    out: list[Weight] = []
    canary_percent = float(serve.get("canary_percent") or 0.0)
    if slots.get("canary") is not None:
        out.append(Weight("canary", int(slots["canary"]), canary_percent))
    if slots.get("stable") is not None:
        stable = 100.0 - (canary_percent if slots.get("canary") is not None else 0.0)
        out.insert(0, Weight("stable", int(slots["stable"]), stable))
    if slots.get("shadow") is not None:
        out.append(Weight("shadow", int(slots["shadow"]), float(serve.get("shadow_percent") or 0.0), mirrored=True))
    return out


def live(status_doc: dict[str, Any], name: str, now: float) -> dict[str, Any]:
    """The live view of one model (``/api/models/NAME/live``): weights, the running rollout, per-slot windows."""
    serve = status_doc.get("serve")
    model = (status_doc.get("models") or {}).get(name) or {}
    slots = {}
    for slot, window in (status_doc.get("live") or {}).items():
        if slot == "shadow_pairs" or not isinstance(window, dict):
            continue
        slots[slot] = {k: window.get(k) for k in ("requests", *LIVE_METRICS)}
    return {
        "time": now,
        "model": name,
        "weights": [w.__dict__ for w in weights(serve if serve and serve.get("model") == name else None)],
        "rollout": model.get("active_rollout"),
        "slots": slots,
        "window_s": status_doc.get("live_window_s"),
        "serve_error": status_doc.get("serve_error"),
    }


@dataclass
class VersionRow:
    version: int
    created_at: str
    parent: int | None
    aliases: list[str]
    gate: str | None
    snapshot: str | None
    deleted: bool


def version_rows(versions: list[ModelVersion]) -> list[VersionRow]:
    rows = []
    for v in sorted(versions, key=lambda v: -v.version):
        gate = v.annotations.get("gate")
        rows.append(
            VersionRow(
                version=v.version,
                created_at=_when(v.created_at),
                parent=v.parent,
                aliases=sorted(v.aliases),
                gate=gate.get("decision") if isinstance(gate, dict) else None,
                snapshot=v.lineage.get("snapshot_id"),
                deleted=v.deleted_at is not None,
            )
        )
    return rows


@dataclass
class RolloutRow:
    id: int
    strategy: str
    from_version: int | None
    to_version: int
    status: str
    reason: str | None
    started_at: str
    ended_at: str
    verdicts: dict[str, int]
    rollback_reason: str | None


def rollout_rows(rollouts: list[RolloutRecord]) -> list[RolloutRow]:
    rows = []
    for r in rollouts[:MAX_ROLLOUTS]:
        counts: dict[str, int] = {}
        for ev in r.history:
            kind = VERDICT_EVENTS.get(str(ev.get("event")))
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
        rows.append(
            RolloutRow(
                id=r.id,
                strategy=r.strategy,
                from_version=r.from_version,
                to_version=r.to_version,
                status=r.status,
                reason=r.state.reason,
                started_at=_when(r.started_at),
                ended_at=_when(r.ended_at),
                verdicts=counts,
                rollback_reason=rollback_reason(r),
            )
        )
    return rows


def overview(reg: Registry, status_doc: dict[str, Any]) -> dict[str, Any]:
    models = []
    for name in reg.list_models():
        info = (status_doc.get("models") or {}).get(name) or {}
        versions = reg.list_versions(name)
        models.append(
            {
                "name": name,
                "versions": len(versions),
                "aliases": info.get("aliases") or reg.aliases(name),
                "deployments": info.get("deployments") or [],
                "active_rollout": info.get("active_rollout"),
                "last_rollout": info.get("last_rollout"),
            }
        )
    return {"models": models, "capture": capture_rows(status_doc.get("capture"))}


def capture_rows(capture: dict[str, Any] | None) -> dict[str, Any]:
    """Capture health as a table: outcome -> table -> rows, plus what is not per table."""
    if not capture:
        return {"running": False, "tables": [], "outcomes": [], "rows": {}, "other": {}}
    if "error" in capture:
        return {"running": False, "error": capture["error"], "tables": [], "outcomes": [], "rows": {}, "other": {}}
    rows: dict[str, dict[str, int]] = {}
    other: dict[str, Any] = {}
    for key, value in capture.items():
        if isinstance(value, dict) and all(isinstance(n, int | float) for n in value.values()):
            rows[key] = {str(t): int(n) for t, n in value.items()}
        elif isinstance(value, int | float | str | bool) or value is None:
            other[key] = value
    tables = sorted({t for per in rows.values() for t in per})
    return {"running": True, "tables": tables, "outcomes": sorted(rows), "rows": rows, "other": other}


def model_page(reg: Registry, name: str, status_doc: dict[str, Any], now: float) -> dict[str, Any]:
    rollouts = reg.rollouts(name)
    current = live(status_doc, name, now)
    active = reg.active_rollout(name)
    history = _step_series(active) if active is not None else None
    return {
        "name": name,
        "aliases": reg.aliases(name),
        "versions": version_rows(reg.list_versions(name, include_deleted=True)),
        "rollouts": rollout_rows(rollouts),
        "live": current,
        "active": active,
        "series": history,
    }


def _step_series(r: RolloutRecord) -> dict[str, Any]:
    """Per-slot metrics at every judged step of a rollout (its history), as chart series: time -> value."""
    out: dict[str, dict[str, list[list[float | None]]]] = {m: {} for m in LIVE_METRICS}
    for ev in r.history:
        if ev.get("event") not in VERDICT_EVENTS:
            continue
        t = _ts(ev["time"])
        for slot in ("stable", "canary"):
            window = ev.get(slot)
            if not isinstance(window, dict):
                continue
            for m in LIVE_METRICS:
                out[m].setdefault(slot, []).append([t, window.get(m)])
    return out


def rollout_page(reg: Registry, rid: int) -> dict[str, Any]:
    r = reg.rollout(rid)
    start = _ts(r.started_at) if r.started_at else None
    points = traffic_timeline(r)
    if start is not None:
        points = [(start, 0.0), *points]
    return {
        "rollout": r,
        "row": rollout_rows([r])[0],
        "traffic": [[t, p] for t, p in points],
        "verdicts": [{"time": _when(t), "verdict": kind, "what": what} for t, kind, what in verdicts(r)],
        "events": [
            {
                "time": _when(ev.get("time")),
                "event": ev.get("event"),
                "details": {k: v for k, v in ev.items() if k not in ("time", "event", "canary", "stable", "plan")},
                "canary": ev.get("canary"),
                "stable": ev.get("stable"),
            }
            for ev in r.history
        ],
    }


@dataclass
class Node:
    id: str
    kind: str  # version, snapshot, training, gate
    title: str
    lines: list[str] = field(default_factory=list)
    href: str | None = None


def lineage(reg: Registry, name: str, version: int) -> dict[str, Any]:
    """The lineage graph of ``name@version``: its ancestors (each from its parent), and for each version the
    data snapshot and training run it came from and the gate's report on it."""
    chain = reg.lineage(f"{name}@{version}")
    nodes: list[Node] = []
    edges: list[tuple[str, str, str]] = []
    for v in chain:
        vid = f"v{v.version}"
        lines = [f"created {_when(v.created_at)}"]
        if v.aliases:
            lines.append("aliases: " + ", ".join(sorted(v.aliases)))
        nodes.append(Node(vid, "version", f"{name}@{v.version}", lines, href=f"versions/{v.version}"))
        if v.parent is not None:
            edges.append((f"v{v.parent}", vid, "parent of"))
        snap = v.lineage.get("snapshot_id")
        if snap:
            nodes.append(Node(f"s{v.version}", "snapshot", f"snapshot {str(snap)[:12]}", _snapshot_lines(v)))
            edges.append((f"s{v.version}", f"t{v.version}", "trained on"))
            training = v.lineage.get("training_config") or {}
            metrics = v.lineage.get("metrics") or {}
            tlines = [f"{k}: {_short(training[k])}" for k in list(training)[:3]]
            tlines += [f"{k}: {_short(metrics[k])}" for k in list(metrics)[:3]]
            nodes.append(Node(f"t{v.version}", "training", "training run", tlines))
            edges.append((f"t{v.version}", vid, "produced"))
        gate = v.annotations.get("gate")
        if isinstance(gate, dict):
            glines = [f"decision: {gate.get('decision')}"]
            if gate.get("against") is not None:
                glines.append(f"against v{gate['against']}")
            glines += [str(r) for r in (gate.get("reasons") or [])[:3]]
            nodes.append(Node(f"g{v.version}", "gate", "gate report", glines))
            edges.append((vid, f"g{v.version}", "judged"))
    return {"name": name, "version": version, "chain": chain, "nodes": nodes, "edges": edges}


def _snapshot_lines(v: ModelVersion) -> list[str]:
    lines = []
    for key in ("snapshot_rows", "rows", "data_sources"):
        if key in v.lineage:
            lines.append(f"{key}: {_short(v.lineage[key])}")
    return lines


def _short(value: Any, n: int = 40) -> str:
    text = str(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _ts(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


def _when(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    try:
        return datetime.fromtimestamp(_ts(value)).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, TypeError):
        return str(value)
