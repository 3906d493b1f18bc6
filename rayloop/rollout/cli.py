"""``rayloop deploy|rollback|promote|abort|status``: the rollout controller on the command line.

Registered lazily by :mod:`rayloop.cli`; Ray is imported only when a command runs.

Exit codes: 0 done; 1 a user error (message and hint on stderr); 2 the
rollout ended without the new version (rolled back or aborted).
"""

from __future__ import annotations

import getpass
import os
import time
from typing import TYPE_CHECKING, Any

import click

from rayloop.clisupport import ExitCode, print_json, settings

if TYPE_CHECKING:
    from rayloop.registry import RolloutRecord


def _actor() -> str:
    try:
        return os.environ.get("RAYLOOP_ACTOR") or f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def _backend(ctx: click.Context) -> Any:
    from rayloop.rollout.controller import _default_backend

    return _default_backend(settings(ctx), start_local=False)


def _echo_event(ev: dict[str, Any]) -> None:
    click.echo(format_event(ev))


def format_event(ev: dict[str, Any]) -> str:
    """One line of a rollout's timeline (a live event: epoch ``time``; a stored one: ISO ``time``)."""
    t = ev.get("time")
    if isinstance(t, str):
        ts = t.replace("T", " ")[:19]
    else:
        ts = time.strftime("%H:%M:%S", time.localtime(float(t or 0)))
    details = {k: v for k, v in ev.items() if k not in ("time", "event", "rollout_id", "plan", "canary", "stable")}
    line = f"{ts} rollout {ev['rollout_id']}: {ev['event']}" if "rollout_id" in ev else f"{ts} {ev['event']}"
    if ev["event"] == "serve":  # progress while Serve starts or moves replicas (not stored in the history)
        line += f" {ev.get('status')}"
    elif ev["event"] == "step_passed" and ev.get("canary"):
        c, s = ev["canary"], ev.get("stable") or {}
        line += (
            f" {ev['percent']}% canary: {c['requests']} req, {c['error_rate']:.1%} err, p95 {c['p95_ms']} ms,"
            f" rating {c['mean_rating']} | stable: {s.get('requests')} req, p95 {s.get('p95_ms')} ms,"
            f" rating {s.get('mean_rating')}"
        )
    elif details:
        line += " " + ", ".join(f"{k}={v}" for k, v in details.items())
    return line


def _headline(record: RolloutRecord) -> str:
    """``rollout ID of NAME vA -> vB (STRATEGY): STATUS (REASON)``."""
    reason = record.state.reason
    return (
        f"rollout {record.id} of {record.name} v{record.from_version} -> v{record.to_version} "
        f"({record.strategy}): {record.status}" + (f" ({reason})" if reason else "")
    )


def _finish(record: RolloutRecord, as_json: bool) -> None:
    if as_json:
        print_json(record.to_json())
    else:
        click.echo(_headline(record))
    if record.status in ("rolled_back", "aborted"):
        raise SystemExit(ExitCode.NOT_PROMOTED)


@click.command("deploy")
@click.argument("ref")
@click.option(
    "--strategy",
    type=click.Choice(["rolling", "blue-green", "canary", "shadow"]),
    default=None,
    help="How to move traffic (default: rollout.strategy).",
)
@click.option("--steps", default=None, help="Canary traffic percentages, e.g. 5,25,50,100.")
@click.option(
    "--interval", default=None, help="Time per canary step (rolling: watch time; shadow: duration), e.g. 30s."
)
@click.option("--hold", default=None, help="Blue-green: keep blue warm this long after the switch, e.g. 60s.")
@click.option("--force", is_flag=True, help="Deploy even a version the validation gate rejected.")
@click.option(
    "--env",
    type=click.Choice(["production", "staging"]),
    default="production",
    show_default=True,
    help="staging: serve the version on its own route for testers (serving.staging_route_prefix) and move "
    "NAME@staging; production traffic is not touched. Promote it with `rayloop deploy NAME@staging`.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final rollout record as JSON (no progress lines).")
@click.pass_context
def deploy_cmd(
    ctx: click.Context,
    ref: str,
    strategy: str | None,
    steps: str | None,
    interval: str | None,
    hold: str | None,
    force: bool,
    env: str,
    as_json: bool,
) -> None:
    """Roll NAME@REF out on the serving app (first deploy: start it).

    Exits 4 when the rollout ends rolled back or aborted. Running it again
    after a crash first finishes or rolls back the orphaned rollout.
    """
    from rayloop.rollout.controller import deploy, parse_duration, parse_steps, preflight

    s = settings(ctx)
    if env == "staging":
        if strategy or steps or interval or hold or force:
            raise click.UsageError(
                "--env staging serves the version as it is: no --strategy, --steps, --interval, --hold or --force"
            )
        from rayloop.rollout.staging import deploy_staging

        out = deploy_staging(s, ref)
        if as_json:
            print_json(out)
        else:
            was = f" (was v{out['previous_staging']})" if out["previous_staging"] else ""
            click.echo(f"staging: {out['model']}@v{out['version']}{was} at {out['url']}; {out['alias']} moved")
        return
    # Bad flags, a bad ref or a rejected version fail before any cluster is touched.
    step_list = None if steps is None else parse_steps(steps)
    interval_s = None if interval is None else parse_duration(interval)
    hold_s = None if hold is None else parse_duration(hold)
    preflight(s, ref, force)
    record = deploy(
        s,
        ref,
        strategy or s.rollout.strategy,
        steps=step_list,
        interval_s=interval_s,
        hold_s=hold_s,
        force=force,
        on_event=None if as_json else _echo_event,
        backend=_backend(ctx),
    )
    _finish(record, as_json)


def _command(ctx: click.Context, name: str, command: str, as_json: bool) -> None:
    from rayloop.rollout.controller import send_command

    record = send_command(settings(ctx), name, command, by=_actor(), backend=_backend(ctx))
    _finish(record, as_json)


@click.command("promote")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout record as JSON.")
@click.pass_context
def promote_cmd(ctx: click.Context, name: str, as_json: bool) -> None:
    """Skip the remaining steps/hold of NAME's rollout: promote the new version now."""
    _command(ctx, name, "promote", as_json)


@click.command("abort")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout record as JSON.")
@click.pass_context
def abort_cmd(ctx: click.Context, name: str, as_json: bool) -> None:
    """Stop NAME's rollout: all traffic back to the old version (status aborted)."""
    _command(ctx, name, "abort", as_json)


@click.command("rollback")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout record as JSON.")
@click.pass_context
def rollback_cmd(ctx: click.Context, name: str, as_json: bool) -> None:
    """Roll NAME back: stop its rollout, or (none running) return production to 'previous'."""
    from rayloop.rollout.controller import send_command

    record = send_command(settings(ctx), name, "rollback", by=_actor(), backend=_backend(ctx))
    if as_json:
        print_json(record.to_json())
    else:
        production = record.to_version if record.status == "succeeded" else record.from_version
        click.echo(f"rollout {record.id} of {record.name}: {record.status}; production is v{production}")


@click.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: app, serve (slots, weights), live, models.")
@click.option("--reconcile", is_flag=True, help="First finish or roll back rollouts whose controller is gone.")
@click.option("--window", default="60s", show_default=True, help="Live metrics over this window.")
@click.pass_context
def status_cmd(ctx: click.Context, name: str | None, as_json: bool, reconcile: bool, window: str) -> None:
    """Versions, aliases, slots, weights, the current rollout step and live metrics per slot.

    JSON keys: ``app``, ``serve`` (slots -> version, canary_percent,
    shadow_percent), ``live`` (slot -> requests, errors, error_rate, p50_ms,
    p95_ms, ratings, mean_rating), ``models`` (NAME -> aliases, deployments,
    active_rollout, last_rollout), and ``reconciled`` with ``--reconcile``.
    """
    from rayloop.registry import Registry
    from rayloop.rollout.controller import parse_duration, status
    from rayloop.rollout.controller import reconcile as do_reconcile

    s = settings(ctx)
    reconciled: dict[str, Any] = {}
    backend = None
    if reconcile:
        backend = _backend(ctx)
        for n in [name] if name else Registry.from_settings(s).list_models():
            out = do_reconcile(s, n, backend=backend, actor=_actor())
            reconciled[n] = {"action": out.action, "reason": out.reason}
            if out.rollout is not None:
                reconciled[n]["rollout_id"] = out.rollout.id
                reconciled[n]["status"] = out.rollout.status
    st = status(s, name, backend=backend, window_s=parse_duration(window))
    if reconcile:
        st["reconciled"] = reconciled
    if as_json:
        print_json(st)
        return
    _print_status(st)


@click.command("undeploy")
@click.argument("name")
@click.option(
    "--env",
    type=click.Choice(["production", "staging"]),
    default="production",
    show_default=True,
    help="Which of NAME's apps to delete.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def undeploy_cmd(ctx: click.Context, name: str, env: str, as_json: bool) -> None:
    """Stop serving NAME: delete its Serve app (versions and aliases stay in the registry)."""
    from rayloop.rollout.controller import undeploy
    from rayloop.rollout.staging import undeploy_staging

    if env == "staging":
        out = undeploy_staging(settings(ctx), name)
    else:
        out = undeploy(settings(ctx), name, backend=_backend(ctx))
    if as_json:
        print_json(out)
    elif out["removed"]:
        click.echo(f"{name}: Serve app {out['app']!r} deleted")
    else:
        click.echo(f"{name}: nothing was deployed (app {out['app']!r})")


@click.group("rollouts")
def rollouts() -> None:
    """Rollout history: what each rollout did, step by step."""


@rollouts.command("list")
@click.argument("name", required=False)
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of rollout summaries.")
@click.pass_context
def rollouts_list(ctx: click.Context, name: str | None, limit: int, as_json: bool) -> None:
    """The last rollouts (of NAME, or of every model), newest first."""
    from rich.table import Table

    from rayloop.clisupport import console
    from rayloop.rollout.controller import rollout_history

    rows = rollout_history(settings(ctx), name, limit=limit)
    if as_json:
        print_json(rows)
        return
    t = Table("id", "model", "strategy", "from", "to", "status", "started (UTC)", "reason")
    for r in rows:
        t.add_row(
            str(r["id"]),
            r.get("name") or "",
            r["strategy"],
            "" if r["from_version"] is None else f"v{r['from_version']}",
            f"v{r['to_version']}",
            r["status"],
            (r["started_at"] or "")[:19].replace("T", " "),
            r.get("reason") or "",
        )
    console().print(t)


@rollouts.command("show")
@click.argument("rollout_id", type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print the whole rollout record (plan, state, history) as JSON.")
@click.pass_context
def rollouts_show(ctx: click.Context, rollout_id: int, as_json: bool) -> None:
    """One rollout and its timeline."""
    from rayloop.rollout.controller import rollout_record

    rec = rollout_record(settings(ctx), rollout_id)
    if as_json:
        print_json(rec.to_json())
        return
    click.echo(_headline(rec))
    for ev in rec.history:
        click.echo("  " + format_event(ev))


def _print_status(st: dict[str, Any]) -> None:
    from rich.table import Table

    from rayloop.clisupport import console

    con = console()
    for n, r in st.get("reconciled", {}).items():
        con.print(f"reconcile {n}: {r['action']}" + (f" ({r['reason']})" if r.get("reason") else ""))
    serve = st["serve"]
    if serve is None:
        con.print(f"Serve app {st['app']!r}: not deployed" + (f" ({st['serve_error']})" if st["serve_error"] else ""))
    else:
        con.print(
            f"Serve app {st['app']!r} serves {serve['model']}: canary {serve['canary_percent']:g}%, "
            f"shadow {serve['shadow_percent']:g}%"
        )
        t = Table("slot", "version", f"requests ({st['live_window_s']:g}s)", "error rate", "p95 ms", "mean rating")
        for slot, version in serve["slots"].items():
            m = st["live"].get(slot) or {}
            t.add_row(
                slot,
                _slot_state(version, serve["warm"].get(slot)),
                str(m.get("requests", 0)),
                "" if not m else f"{m['error_rate']:.1%}",
                str(m.get("p95_ms") or ""),
                str(m.get("mean_rating") if m.get("mean_rating") is not None else ""),
            )
        con.print(t)
        placed = [(slot, r) for slot, reps in (st.get("replicas") or {}).items() for r in reps]
        if placed:
            t = Table("replica", "slot", "state", "node", "version")
            for slot, r in placed:
                v = r.get("version", "?")
                t.add_row(
                    str(r["replica"]),
                    slot,
                    str(r["state"]),
                    f"{r.get('node_ip') or ''} {str(r.get('node_id') or '')[:12]}".strip(),
                    "-" if v is None else (f"v{v}" if isinstance(v, int) else str(v)),
                )
            con.print(t)
    cap = st.get("capture")
    if cap:
        con.print(_capture_line(cap))
    for n, m in st["models"].items():
        aliases = ", ".join(f"{k}=v{v}" for k, v in sorted(m["aliases"].items())) or "no aliases"
        con.print(f"{n}: {aliases}")
        a = m["active_rollout"]
        if a is not None:
            where = f"step {a['step']} ({a['percent']}%)" if a.get("step") is not None else a["phase"]
            alive = "" if a.get("owner_alive", True) else " [controller gone: run `rayloop status --reconcile`]"
            con.print(f"  rollout {a['id']} {a['strategy']} v{a['from_version']} -> v{a['to_version']}: {where}{alive}")
        elif m["last_rollout"] is not None:
            lr = m["last_rollout"]
            con.print(
                f"  last rollout {lr['id']} {lr['strategy']} v{lr['from_version']} -> v{lr['to_version']}: "
                f"{lr['status']}" + (f" ({lr['reason']})" if lr.get("reason") else "")
            )


def _capture_line(cap: dict[str, Any]) -> str:
    """One line of capture health: rows by outcome over all tables, and what waits in the journal."""
    if "error" in cap:
        return f"capture: unknown ({cap['error']})"
    outcomes = ("written", "quarantined", "spilled", "replayed", "recovered", "dropped")
    total = {k: sum((cap.get(k) or {}).values()) for k in outcomes}
    journal = cap.get("journal") or {}
    line = "capture: " + ", ".join(f"{k} {v}" for k, v in total.items())
    if journal.get("rows"):
        line += f"; {journal['rows']} rows waiting in the journal ({journal.get('dir')})"
    if cap.get("storage_down"):
        line += "; STORAGE DOWN"
    return line


def _slot_state(version: int | None, warm: int | None) -> str:
    if version is not None:
        return f"v{version}"
    return "idle" if warm is None else f"idle (warm: v{warm} loaded)"
