"""``rayloop report NAME``: one offline HTML page on a model's loop.

What it shows, all read from what rayloop already keeps (the registry and the interaction store):

- the traffic weight of each rollout's new version over time, with the analysis verdict of each step;
- error rate, time to first token and feedback score per version, from the captured interactions;
- evaluation accuracy per version and set, from the gate's reports (candidate and the production
  version it was compared with);
- the lineage chain (parent, training snapshot, gate decision, aliases) and the last rollouts.

The page is self-contained: plots are inline SVG (matplotlib, Agg backend), no script and no external
resource, so it opens from a file on an air-gapped machine.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayloop.config import Settings
from rayloop.errors import NotFoundError
from rayloop.monitoring.loop import VERDICT_EVENTS

if TYPE_CHECKING:
    from rayloop.registry import RolloutRecord

MAX_ROLLOUTS = 10


@dataclass
class VersionStats:
    """What users saw of one version: from its captured interactions and their feedback."""

    version: int
    requests: int = 0
    errors: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    ratings: list[int] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def ttft_quantile(self, q: float) -> float | None:
        if not self.ttft_ms:
            return None
        xs = sorted(self.ttft_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    @property
    def mean_rating(self) -> float | None:
        return sum(self.ratings) / len(self.ratings) if self.ratings else None


def version_stats(settings: Settings, name: str) -> dict[int, VersionStats]:
    """Per version: answered requests (distinct ids), server errors, TTFTs and the ratings users gave."""
    from rayloop.data.capture import read_feedback, read_interactions
    from rayloop.storage import Storage

    storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
    rows = read_interactions(storage, model=name).to_pylist()
    stats: dict[int, VersionStats] = {}
    seen: set[str] = set()
    for r in rows:
        if r["request_id"] in seen:
            continue  # at least once: a row may be stored twice
        seen.add(r["request_id"])
        v = int(r["model_version"])
        s = stats.setdefault(v, VersionStats(v))
        s.requests += 1
        s.errors += r.get("status") == "error"
        if r.get("ttft_ms") is not None:
            s.ttft_ms.append(float(r["ttft_ms"]))
    rated: set[str] = set()
    for f in read_feedback(storage).to_pylist():
        if f.get("model_name") != name or f.get("rating") is None or f["request_id"] in rated:
            continue
        rated.add(f["request_id"])
        v = int(f["model_version"])
        stats.setdefault(v, VersionStats(v)).ratings.append(int(f["rating"]))
    return dict(sorted(stats.items()))


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def traffic_timeline(rollout: RolloutRecord) -> list[tuple[float, float]]:
    """(time, percent of traffic on the rollout's new version) at each change, from its history."""
    points: list[tuple[float, float]] = []
    for ev in rollout.history:
        t = _ts(ev["time"])
        if ev.get("event") == "traffic":
            points.append((t, float(ev.get("canary_percent") or 0.0)))
        elif ev.get("event") in ("promote", "switch") and rollout.status == "succeeded":
            points.append((t, 100.0))
        elif ev.get("event") == "rollback":
            points.append((t, 0.0))
    return points


def verdicts(rollout: RolloutRecord) -> list[tuple[float, str, str]]:
    """(time, pass|fail|inconclusive, what) of every judged step of a rollout."""
    out = []
    for ev in rollout.history:
        kind = VERDICT_EVENTS.get(str(ev.get("event")))
        if kind is None:
            continue
        what = f"step {ev['step']} at {ev['percent']:g}%" if "step" in ev and "percent" in ev else str(ev["event"])
        reasons = ev.get("reasons") or []
        if reasons:
            what += ": " + "; ".join(str(r) for r in reasons[:2])
        out.append((_ts(ev["time"]), kind, what))
    return out


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG is inline in HTML


def _plots(
    rollouts: list[RolloutRecord], stats: dict[int, VersionStats], evals: dict[int, dict[str, float]]
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import date2num

    out: dict[str, str] = {}
    colours = {"pass": "tab:green", "fail": "tab:red", "inconclusive": "tab:orange"}
    if rollouts:
        fig, ax = plt.subplots(figsize=(9, 3.2))
        for r in reversed(rollouts):
            pts = traffic_timeline(r)
            if not pts:
                continue
            t0 = _ts(r.started_at) if r.started_at else pts[0][0]
            xs = [t0] + [t for t, _ in pts]
            ys = [0.0] + [p for _, p in pts]
            label = f"#{r.id} v{r.from_version}→v{r.to_version} ({r.strategy}, {r.status})"
            ax.step(date2num([datetime.fromtimestamp(x) for x in xs]), ys, where="post", label=label)
            for t, kind, _ in verdicts(r):
                y = next((p for tt, p in reversed(pts) if tt <= t), 0.0)
                ax.scatter(date2num([datetime.fromtimestamp(t)]), [y], color=colours[kind], zorder=3, s=28)
        ax.xaxis_date()
        ax.set_ylabel("traffic on new version (%)")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(
            "Rollouts: traffic weight over time (dots: step verdicts, green pass, red fail, orange inconclusive)",
            fontsize=9,
        )
        fig.autofmt_xdate()
        out["traffic"] = _svg(fig)
    if stats:
        vs = list(stats)
        fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
        axes[0].bar([f"v{v}" for v in vs], [100 * stats[v].error_rate for v in vs], color="tab:red")
        axes[0].set_title("error rate (%)", fontsize=9)
        p50 = [stats[v].ttft_quantile(0.5) or 0.0 for v in vs]
        p95 = [stats[v].ttft_quantile(0.95) or 0.0 for v in vs]
        x = range(len(vs))
        axes[1].bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
        axes[1].bar([i + 0.2 for i in x], p95, width=0.4, label="p95")
        axes[1].set_xticks(list(x), [f"v{v}" for v in vs])
        axes[1].set_title("time to first token (ms)", fontsize=9)
        axes[1].legend(fontsize=7)
        axes[2].bar([f"v{v}" for v in vs], [stats[v].mean_rating or 0.0 for v in vs], color="tab:purple")
        axes[2].set_ylim(-1, 1)
        axes[2].axhline(0, color="grey", linewidth=0.5)
        axes[2].set_title("mean feedback rating (-1..1)", fontsize=9)
        fig.tight_layout()
        out["versions"] = _svg(fig)
    if evals:
        sets = sorted({s for per in evals.values() for s in per})
        vs = sorted(evals)
        fig, ax = plt.subplots(figsize=(9, 2.8))
        width = 0.8 / max(1, len(sets))
        for j, s in enumerate(sets):
            ax.bar(
                [i + j * width for i in range(len(vs))],
                [100 * evals[v].get(s, float("nan")) for v in vs],
                width=width,
                label=s,
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(vs))], [f"v{v}" for v in vs])
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=7, ncol=min(4, len(sets)))
        ax.set_title("Evaluation accuracy per version (the gate's reports)", fontsize=9)
        out["evaluation"] = _svg(fig)
    return out


def eval_accuracy(versions: list[Any]) -> dict[int, dict[str, float]]:
    """Version -> set -> accuracy, from every gate report (a candidate's, and the production it was judged
    against: the newest report wins for a version)."""
    out: dict[int, dict[str, float]] = {}
    for mv in sorted(versions, key=lambda m: m.version):
        report = mv.annotations.get("evaluation") or {}
        for side in ("production", "candidate"):
            part = report.get(side) or {}
            v: int | None = mv.version
            if side == "production":  # its report is labelled NAME@VERSION
                label = str(part.get("model") or "")
                v = int(label.rpartition("@")[2]) if label.rpartition("@")[2].isdigit() else None
            if v is None:
                continue
            for s, m in (part.get("sets") or {}).items():
                if isinstance(m, dict) and m.get("accuracy") is not None:
                    out.setdefault(int(v), {})[s] = float(m["accuracy"])
    return dict(sorted(out.items()))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(settings: Settings, name: str, out_dir: str | Path) -> Path:
    """Write ``out_dir/index.html`` for model ``name``; return its path."""
    from rayloop.registry import Registry

    reg = Registry.from_settings(settings)
    if name not in reg.list_models():
        raise NotFoundError(f"model {name!r} does not exist", hint="See `rayloop models list`.")
    versions = reg.list_versions(name, include_deleted=True)
    aliases = reg.aliases(name)
    rollouts = reg.rollouts(name)[:MAX_ROLLOUTS]
    stats = version_stats(settings, name)
    evals = eval_accuracy(versions)
    plots = _plots(rollouts, stats, evals)

    by_version: dict[int, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(v, []).append(alias)
    lineage_rows = []
    for mv in sorted(versions, key=lambda m: m.version, reverse=True):
        gate = mv.annotations.get("gate") or {}
        lineage_rows.append(
            [
                f"v{mv.version}",
                "-" if mv.parent is None else f"v{mv.parent}",
                str(mv.lineage.get("snapshot_id") or "-"),
                str(gate.get("decision") or "not evaluated"),
                ", ".join(sorted(by_version.get(mv.version, []))) or "-",
                mv.created_at.strftime("%Y-%m-%d %H:%M"),
            ]
        )
    rollout_rows = []
    for r in rollouts:
        judged = verdicts(r)
        last = judged[-1] if judged else None
        rollout_rows.append(
            [
                f"#{r.id}",
                r.strategy,
                f"v{r.from_version} → v{r.to_version}" if r.from_version is not None else f"→ v{r.to_version}",
                r.status,
                (r.started_at or "")[:19].replace("T", " "),
                f"{len(judged)} judged" + (f", last {last[1]}: {last[2]}" if last else ""),
            ]
        )
    stats_rows = [
        [
            f"v{s.version}",
            str(s.requests),
            f"{100 * s.error_rate:.1f}%",
            "-" if s.ttft_quantile(0.5) is None else f"{s.ttft_quantile(0.5):.0f}",
            "-" if s.mean_rating is None else f"{s.mean_rating:+.2f} ({len(s.ratings)})",
        ]
        for s in stats.values()
    ]

    def figure(key: str, caption: str) -> str:
        if key not in plots:
            return f"<p>No data yet for: {html.escape(caption)}.</p>"
        return f'<figure role="img" aria-label="{html.escape(caption)}">{plots[key]}<figcaption>{html.escape(caption)}</figcaption></figure>'

    production = aliases.get("production")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rayloop report: {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
figure{{margin:1em 0}}figcaption{{font-size:90%;color:#444}}</style></head>
<body><main>
<h1>rayloop report: {html.escape(name)}</h1>
<p>Production: {"none" if production is None else f"v{production}"} · {len(versions)} versions · {len(rollouts)} recent rollouts ·
generated {datetime.now().strftime("%Y-%m-%d %H:%M")}</p>
<h2>Rollouts</h2>
{figure("traffic", "traffic weight of each rollout's new version over time, with step verdicts")}
{_table(["rollout", "strategy", "versions", "status", "started", "analysis"], rollout_rows)}
<h2>Versions in service</h2>
{figure("versions", "error rate, time to first token and feedback per version (captured interactions)")}
{_table(["version", "requests", "errors", "TTFT p50 (ms)", "mean rating"], stats_rows)}
<h2>Evaluation</h2>
{figure("evaluation", "evaluation accuracy per version and set")}
<h2>Lineage</h2>
{_table(["version", "parent", "training snapshot", "gate", "aliases", "registered"], lineage_rows)}
</main></body></html>
"""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
