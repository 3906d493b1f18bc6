"""The Grafana dashboard and the Prometheus alert rules, as data.

Both are built here from one list of queries, so the tests can run every query the dashboard and the rules
use against a real Prometheus (``tests/integration/test_rollout.py``), and ``rayloop up`` writes them next
to the scrape config (``$RAYLOOP_HOME/monitoring/``). The files committed under ``cluster/monitoring/`` are
the same output (a unit test keeps them in step: ``python -m rayloop.monitoring.assets cluster/monitoring``).

Written as plain dictionaries rather than with grafanalib: the dashboard is a dozen timeseries panels whose
queries are the interesting part, grafanalib's last release predates Grafana 10's schema, and its JSON
would still need this module's query list for the tests.

Ray exports every metric with a ``ray_`` prefix. ``$model`` is the dashboard's model variable;
``$__rate_interval`` is Grafana's rate window (the tests put in ``1m``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DASHBOARD_FILE = "rayloop-dashboard.json"
RULES_FILE = "rayloop-alerts.yml"
DASHBOARD_UID = "rayloop-loop"

SEL = '{model=~"$model"}'
RATE = "$__rate_interval"


def _ratio_5xx(window: str, sel: str = 'model=~"$model"') -> str:
    """Share of 5xx answers per version and slot; 0 (not nothing) while there are none."""
    by = "sum by (model, version, slot)"
    total = f"{by} (rate(ray_rayloop_requests_total{{{sel}}}[{window}]))"
    errors = f'{by} (rate(ray_rayloop_requests_total{{{sel},status_class="5xx"}}[{window}]))'
    return f"({errors} or {total} * 0) / {total}"


def _mean_rating(window: str, sel: str = 'model=~"$model"') -> str:
    """Mean rating (-1..1) per version: (rate of +1 - rate of -1) / rate of rated feedback; a rating value
    nobody gave counts 0 (its series does not exist)."""
    by = "sum by (model, version)"
    rated = f'{by} (rate(ray_rayloop_feedback_total{{{sel},rating=~"-1|0|1"}}[{window}]))'

    def count(value: str) -> str:
        return f'({by} (rate(ray_rayloop_feedback_total{{{sel},rating="{value}"}}[{window}])) or {rated} * 0)'

    return f"({count('1')} - {count('-1')}) / {rated}"


def _quantile(q: float, metric: str, by: str = "model, version, slot") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate(ray_{metric}_bucket{SEL}[{RATE}])))"


def _vllm(metric: str, by: str = "model, version, slot", agg: str = "max") -> str:
    """A vLLM engine metric with rayloop's model, version and slot (vLLM's own model_name label stays on the
    version an engine started with; rayloop_engine_info says what the replica serves now)."""
    return (
        f"{agg} by ({by}) ({metric} * on (ReplicaId) group_left (model, version, slot) "
        f"(ray_rayloop_engine_info{SEL} == 1))"
    )


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str
    labels: tuple[str, ...] = ()
    """Labels every series of the result has (the tests check them)."""
    needs: str | None = None
    """What must have happened for the query to have data (None: serving under load, with a rollout)."""


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    kind: str = "timeseries"


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


V = ("model", "version", "slot")

ROWS: tuple[Row, ...] = (
    Row(
        "Serving",
        (
            Panel(
                "Requests per second by version and status",
                "reqps",
                (
                    Query(
                        f"sum by (model, version, slot, status_class) (rate(ray_rayloop_requests_total{SEL}[{RATE}]))",
                        "v{{version}} {{slot}} {{status_class}}",
                        (*V, "status_class"),
                    ),
                ),
            ),
            Panel(
                "Error rate (5xx) by version",
                "percentunit",
                (Query(_ratio_5xx(RATE), "v{{version}} {{slot}}", V),),
                "Share of answers with a 5xx status.",
            ),
            Panel(
                "Time to first token by version",
                "s",
                (
                    Query(_quantile(0.5, "rayloop_time_to_first_token_seconds"), "p50 v{{version}} {{slot}}", V),
                    Query(_quantile(0.95, "rayloop_time_to_first_token_seconds"), "p95 v{{version}} {{slot}}", V),
                ),
            ),
            Panel(
                "Time per output token by version",
                "s",
                (Query(_quantile(0.95, "rayloop_time_per_output_token_seconds"), "p95 v{{version}} {{slot}}", V),),
            ),
            Panel(
                "End-to-end latency by version",
                "s",
                (
                    Query(_quantile(0.5, "rayloop_request_duration_seconds"), "p50 v{{version}} {{slot}}", V),
                    Query(_quantile(0.95, "rayloop_request_duration_seconds"), "p95 v{{version}} {{slot}}", V),
                ),
            ),
            Panel(
                "Tokens per second by version",
                "short",
                (
                    Query(
                        f"sum by (model, version, slot) (rate(ray_rayloop_prompt_tokens_total{SEL}[{RATE}]))",
                        "in v{{version}} {{slot}}",
                        V,
                    ),
                    Query(
                        f"sum by (model, version, slot) (rate(ray_rayloop_generation_tokens_total{SEL}[{RATE}]))",
                        "out v{{version}} {{slot}}",
                        V,
                    ),
                ),
            ),
            Panel(
                "Requests in flight",
                "short",
                (
                    Query(
                        f"sum by (model, version, slot) (ray_rayloop_requests_in_flight{SEL})",
                        "v{{version}} {{slot}}",
                        V,
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Rollout",
        (
            Panel(
                "Traffic weight by version",
                "percentunit",
                (
                    Query(
                        f"max by (model, version, slot) (ray_rayloop_traffic_weight{SEL})", "v{{version}} {{slot}}", V
                    ),
                ),
                "Share of users' requests each slot answers (shadow: share of answers mirrored to it).",
            ),
            Panel(
                "Running rollout: step and new version's weight",
                "short",
                (
                    Query(f"max by (model) (ray_rayloop_rollout_step{SEL})", "step", ("model",)),
                    Query(f"max by (model) (ray_rayloop_rollout_canary_weight{SEL})", "weight", ("model",)),
                ),
            ),
            Panel(
                "Analysis verdicts of rollout steps",
                "short",
                (
                    Query(
                        f"max by (model, verdict) (ray_rayloop_rollout_analysis_total{SEL})",
                        "{{verdict}}",
                        ("model", "verdict"),
                    ),
                ),
                "Pass, fail and inconclusive verdicts, counted over all rollouts of the model.",
            ),
            Panel(
                "Rollouts and rollbacks",
                "short",
                (
                    Query(
                        f"max by (model, strategy, status) (ray_rayloop_rollouts_total{SEL})",
                        "{{strategy}} {{status}}",
                        ("model", "strategy", "status"),
                    ),
                    Query(
                        f"max by (model, reason) (ray_rayloop_rollbacks_total{SEL})",
                        "rollback: {{reason}}",
                        ("model", "reason"),
                    ),
                ),
            ),
            Panel(
                "Version swaps",
                "s",
                (
                    Query(
                        f"sum by (model, mode) (ray_rayloop_weight_swap_duration_seconds_sum{SEL}) / "
                        f"sum by (model, mode) (ray_rayloop_weight_swap_duration_seconds_count{SEL})",
                        "mean {{mode}}",
                        ("model", "mode"),
                    ),
                ),
                "Mean seconds an engine replica took to change versions (fresh start, in place, rebuild).",
            ),
        ),
    ),
    Row(
        "Quality",
        (
            Panel(
                "Feedback by version",
                "short",
                (
                    Query(
                        f"sum by (model, version) (rate(ray_rayloop_feedback_total{SEL}[{RATE}]))",
                        "feedback/s v{{version}}",
                        ("model", "version"),
                    ),
                    Query(_mean_rating(RATE), "mean rating v{{version}}", ("model", "version")),
                ),
                "Ratings are -1, 0 or +1.",
            ),
            Panel(
                "Gate decisions",
                "short",
                (
                    Query(
                        f"max by (model, decision) (ray_rayloop_gate_decisions_total{SEL})",
                        "{{decision}}",
                        ("model", "decision"),
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Engine (vLLM)",
        (
            Panel(
                "KV-cache use",
                "percentunit",
                (Query(_vllm("ray_vllm_kv_cache_usage_perc"), "v{{version}} {{slot}}", V),),
            ),
            Panel(
                "Engine queue",
                "short",
                (
                    Query(_vllm("ray_vllm_num_requests_running"), "running v{{version}} {{slot}}", V),
                    Query(_vllm("ray_vllm_num_requests_waiting"), "waiting v{{version}} {{slot}}", V),
                ),
            ),
            Panel(
                "Engine requests finished, by reason",
                "reqps",
                (
                    Query(
                        _vllm(
                            f"rate(ray_vllm_request_success_total[{RATE}])",
                            by="model, version, slot, finished_reason",
                            agg="sum",
                        ),
                        "v{{version}} {{slot}} {{finished_reason}}",
                        (*V, "finished_reason"),
                    ),
                ),
                "stop: the model ended its answer; length: it hit max_tokens; abort: cancelled.",
            ),
            Panel(
                "Preemptions",
                "short",
                (
                    Query(
                        _vllm("(ray_vllm_num_preemptions_total or ray_vllm_num_requests_running * 0)"),
                        "v{{version}} {{slot}}",
                        V,
                    ),
                ),
                "Sequences the scheduler preempted (KV cache full) since the engine started.",
            ),
        ),
    ),
    Row(
        "Pipeline",
        (
            Panel(
                "Pipeline stage durations (latest run)",
                "s",
                (
                    Query(
                        f"max by (model, stage) (ray_rayloop_pipeline_stage_last_duration_seconds{SEL})",
                        "{{stage}}",
                        ("model", "stage"),
                        needs="a pipeline run",
                    ),
                ),
            ),
            Panel(
                "Pipeline stages by outcome",
                "short",
                (
                    Query(
                        f"max by (model, stage, status) (ray_rayloop_pipeline_stages_total{SEL})",
                        "{{stage}} {{status}}",
                        ("model", "stage", "status"),
                        needs="a pipeline run",
                    ),
                ),
                "Stages done, skipped (a rejected candidate is not deployed) and failed, over all runs.",
            ),
        ),
    ),
    Row(
        "Capture",
        (
            Panel(
                "Captured rows by outcome",
                "short",
                (
                    Query(
                        "sum by (table, outcome) (rate(ray_rayloop_capture_rows_total[$__rate_interval]))",
                        "{{table}} {{outcome}}",
                        ("table", "outcome"),
                    ),
                ),
            ),
        ),
    ),
)


@dataclass(frozen=True)
class Alert:
    name: str
    query: str
    condition: str
    for_: str
    severity: str
    summary: str
    labels: tuple[str, ...]

    @property
    def expr(self) -> str:
        return f"{self.query} {self.condition}"


ALERTS: tuple[Alert, ...] = (
    Alert(
        "RayloopHighErrorRate",
        _ratio_5xx("5m", 'model=~".+"'),
        "> 0.05",
        "2m",
        "critical",
        "More than 5% of {{ $labels.model }} v{{ $labels.version }} ({{ $labels.slot }}) answers are 5xx errors.",
        V,
    ),
    Alert(
        "RayloopSlowTimeToFirstToken",
        "histogram_quantile(0.95, sum by (model, version, slot, le) "
        "(rate(ray_rayloop_time_to_first_token_seconds_bucket[5m])))",
        "> 2",
        "5m",
        "warning",
        "p95 time to first token of {{ $labels.model }} v{{ $labels.version }} is {{ $value | humanizeDuration }}.",
        V,
    ),
    Alert(
        "RayloopCaptureDrops",
        'sum by (table) (increase(ray_rayloop_capture_rows_total{outcome="dropped"}[10m]) '
        "or increase(ray_rayloop_capture_dropped_total[10m]) "
        'or ray_rayloop_capture_rows_total{outcome="written"} * 0)',
        "> 0",
        "0m",
        "critical",
        "{{ $value }} captured {{ $labels.table }} rows were dropped in the last 10 minutes.",
        ("table",),
    ),
    Alert(
        "RayloopRollbackHappened",
        "time() - max by (model) (ray_rayloop_rollout_last_rollback_timestamp_seconds)",
        "< 900",
        "0m",
        "warning",
        "A rollout of {{ $labels.model }} was rolled back in the last 15 minutes (rayloop rollouts list).",
        ("model",),
    ),
    Alert(
        "RayloopNoProductionTraffic",
        'sum by (model) (rate(ray_rayloop_requests_total{slot=~"stable|canary",status_class="2xx"}[15m])) '
        'or max by (model) (ray_rayloop_engine_info{slot="stable"}) * 0',
        "== 0",
        "15m",
        "warning",
        "{{ $labels.model }} is served but answered no request successfully for 15 minutes.",
        ("model",),
    ),
)


def queries() -> list[tuple[str, Query]]:
    """(panel title, query) for every query of the dashboard."""
    return [(p.title, q) for row in ROWS for p in row.panels for q in p.queries]


def grafana_dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (import it, or provision it next to Ray's dashboards)."""
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for row in ROWS:
        panels.append({"type": "row", "id": pid, "title": row.title, "collapsed": False, "gridPos": _pos(0, y, 24, 1)})
        pid, y = pid + 1, y + 1
        for i, p in enumerate(row.panels):
            x = (i % 2) * 12
            panels.append(
                {
                    "type": p.kind,
                    "id": pid,
                    "title": p.title,
                    "description": p.description,
                    "datasource": ds,
                    "gridPos": _pos(x, y, 12, 8),
                    "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                    "targets": [
                        {"refId": chr(ord("A") + j), "datasource": ds, "expr": q.expr, "legendFormat": q.legend}
                        for j, q in enumerate(p.queries)
                    ],
                }
            )
            pid += 1
            if i % 2 == 1 or i == len(row.panels) - 1:
                y += 8
    return {
        "uid": DASHBOARD_UID,
        "title": "rayloop: serving, rollouts, quality",
        "description": "One model's loop: traffic and latency per version, the running rollout, feedback, "
        "gate decisions, vLLM engine state and capture health.",
        "tags": ["rayloop", "ray", "vllm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": ds,
                    "query": {"query": "label_values(ray_rayloop_engine_info, model)", "refId": "model"},
                    "definition": "label_values(ray_rayloop_engine_info, model)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".+",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def _pos(x: int, y: int, w: int, h: int) -> dict[str, int]:
    return {"x": x, "y": y, "w": w, "h": h}


def alert_rules() -> dict[str, Any]:
    """Prometheus alerting rules (``promtool check rules`` accepts them)."""
    return {
        "groups": [
            {
                "name": "rayloop",
                "rules": [
                    {
                        "alert": a.name,
                        "expr": a.expr,
                        "for": a.for_,
                        "labels": {"severity": a.severity},
                        "annotations": {"summary": a.summary},
                    }
                    for a in ALERTS
                ],
            }
        ]
    }


def write_files(directory: Path) -> list[Path]:
    """Write the dashboard and the rules into ``directory``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    dash = directory / DASHBOARD_FILE
    dash.write_text(json.dumps(grafana_dashboard(), indent=2) + "\n")
    rules = directory / RULES_FILE
    rules.write_text(
        "# Generated by rayloop (rayloop.monitoring.assets); thresholds are starting points: tune them.\n"
        + yaml.safe_dump(alert_rules(), sort_keys=False, width=120)
    )
    return [dash, rules]


if __name__ == "__main__":
    for path in write_files(Path(sys.argv[1] if len(sys.argv) > 1 else "cluster/monitoring")):
        print(path)
