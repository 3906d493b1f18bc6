"""The ``rayloop`` command line: a thin layer over the Python API.

Heavy libraries (ray, torch, vllm, deepspeed) are imported inside commands so
``rayloop --help`` answers at once. Errors from the rayloop exception tree are
printed as ``Type: message`` plus a hint, exit code 1; ``RAYLOOP_DEBUG=1``
shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import click

from rayloop.clisupport import ExitCode, Group, console, print_json, settings


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rayloop")
    except PackageNotFoundError:  # a source tree that is not installed
        from rayloop import __version__

        return __version__


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"rayloop {_version()}")
        ctx.exit(0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Settings file (default: $RAYLOOP_CONFIG, else ./rayloop.yaml). Environment variables "
    "RAYLOOP_<SECTION>__<KEY> override it.",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the rayloop version and exit.",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """rayloop: keep a served LLM improving from its own traffic, on Ray."""
    ctx.ensure_object(dict)["config_path"] = config_path
    # stdout carries command results (`--json` must parse); vLLM logs to stdout unless told otherwise.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


# --- config --------------------------------------------------------------
@cli.group(cls=Group)
def config() -> None:
    """Inspect settings."""


@config.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the resolved settings as JSON (passwords in URLs shown as ***)."""
    print_json(settings(ctx).redacted())


@config.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of rayloop.yaml (for editors and CI validation).

    Every setting is also an environment variable: RAYLOOP_ then its path with __ between the levels,
    e.g. serving.http_port is RAYLOOP_SERVING__HTTP_PORT.
    """
    from rayloop.config import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


# --- cluster -------------------------------------------------------------
@cli.command()
@click.pass_context
def up(ctx: click.Context) -> None:
    """Start a local Ray head that outlives this command (or report the running one)."""
    from rayloop import cluster

    s = settings(ctx)
    state = cluster.up(s)
    click.echo(f"Ray head running (pid {state.pid}) at {state.address}; dashboard {state.dashboard_url}")
    if state.recovered:
        click.echo(
            f"Started again from the state the last head left in {state.gcs_storage_path}: worker nodes reconnect, "
            "and Serve's apps and rayloop's actors come back on their own (`rayloop status` shows them)."
        )
    elif state.gcs_storage_path:
        click.echo(f"The head keeps its state in {state.gcs_storage_path}: if it dies, `rayloop up` brings it back.")
    if state.auth_token_path:
        click.echo(
            f"Ray token authentication is on (token in {state.auth_token_path}); "
            'for `ray` commands: eval "$(rayloop env)"'
        )
    else:
        click.echo("Ray token authentication is off (ray.auth: disabled): anyone who reaches its ports can run code")


@cli.command("env")
@click.pass_context
def env_cmd(ctx: click.Context) -> None:
    """Print shell exports for `ray` commands against the head `rayloop up` started (eval "$(rayloop env)")."""
    import shlex

    from rayloop import cluster
    from rayloop.errors import ClusterError

    state = cluster.read_state(settings(ctx))
    if state is None or not state.alive():
        raise ClusterError("no Ray head started by rayloop is running for this RAYLOOP_HOME", hint="Run `rayloop up`.")
    # The Jobs CLI reads RAY_API_SERVER_ADDRESS first; RAY_ADDRESS is left alone (rayloop reads it as the
    # cluster to attach to, and `ray.init` takes no dashboard URL).
    exports = {"RAY_API_SERVER_ADDRESS": state.dashboard_url, **state.auth_env()}
    click.echo("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items()))


@cli.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop the local Ray head that `rayloop up` started (and everything on it)."""
    from rayloop import cluster

    if cluster.down(settings(ctx)):
        click.echo("Ray head stopped.")
    else:
        click.echo("No Ray head started by rayloop is running for this RAYLOOP_HOME.")


# --- demo model ----------------------------------------------------------
@cli.command()
@click.option(
    "--out", type=click.Path(file_okay=False), help="Directory for the base model (default: $RAYLOOP_HOME/base-model)."
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Pre-training steps (default from the model spec).")
@click.option("--seed", type=int, default=0, show_default=True, help="World and model seed.")
@click.option("--force", is_flag=True, help="Rebuild even if the directory or the build cache holds the model.")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Pre-train even if this machine's build cache ($XDG_CACHE_HOME/rayloop/demo-models) holds the same build.",
)
@click.option("--json", "as_json", is_flag=True, help="Print build info as JSON.")
@click.pass_context
def init(
    ctx: click.Context, out: str | None, steps: int | None, seed: int, force: bool, no_cache: bool, as_json: bool
) -> None:
    """Build the demo world and tiny base model locally (no downloads).

    The build is deterministic: one made earlier on this machine with the same recipe is copied from the
    build cache instead of pre-training again (--no-cache pre-trains anyway).
    """
    from rayloop.cluster import ensure_home
    from rayloop.demo import setup

    s = settings(ctx)
    ensure_home(s)
    info = setup.init_base_model(
        s, out=out, steps=steps, seed=seed, force=force, show_progress=not as_json, use_cache=not no_cache
    )
    # The gate needs evaluation sets nobody's feedback wrote: the demo's held-out phrasings and golden prompts.
    info["eval_sets"] = setup.save_demo_eval_sets(s, info["model_dir"], s.serving.model)
    if as_json:
        print_json(info)
    else:
        origin = f", copied from the build cache {info['cached_build']}" if info.get("cached_build") else ""
        click.echo(f"Base model in {info['model_dir']} (final loss {info['final_loss']:.3f}{origin}).")
        click.echo(f"Evaluation sets for {s.serving.model}: {', '.join(info['eval_sets'])}.")


@cli.command()
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True, help="Times each question is asked.")
@click.option("--poison", is_flag=True, help="Users give wrong corrections.")
@click.option("--url", default=None, help="Endpoint (default: serving.http_host/http_port/route_prefix).")
@click.option("--model", "model_name", default=None, help="Model name to ask (default: serving.model).")
@click.option("--json", "as_json", is_flag=True, help="Print the traffic summary as JSON.")
@click.pass_context
def simulate(
    ctx: click.Context, repeats: int, poison: bool, url: str | None, model_name: str | None, as_json: bool
) -> None:
    """Simulated users of the demo world ask questions at the endpoint and rate the answers.

    Every question about a country the demo model never saw is asked REPEATS times; a wrong answer is rated
    -1 with the right answer as a correction. Keys in $RAYLOOP_API_KEYS are used when set.
    """
    from rayloop.demo.traffic import simulate as run_simulation

    s = settings(ctx)
    keys = [k.strip() for k in os.environ.get(s.serving.api_keys_env, "").split(",") if k.strip()]
    stats = run_simulation(
        url or s.serving.base_url,
        model_name or s.serving.model,
        repeats=repeats,
        poison=poison,
        api_key=keys[0] if keys else None,
    )
    out = stats.to_json()
    if as_json:
        print_json(out)
        return
    click.echo(
        f"{out['requests']} requests ({out['failed_requests']} failed), {out['feedback_sent']} feedback rows; "
        "accuracy by version: " + ", ".join(f"v{v} {a:.0%}" for v, a in sorted(out["live_accuracy_by_version"].items()))
    )
    if out["failed_requests"]:
        ctx.exit(ExitCode.ERROR)


@cli.command()
@click.option("--poison", is_flag=True, help="Users give wrong corrections: the gate must reject the candidate.")
@click.option("--steps", default="25,50,100", show_default=True, help="Canary traffic percentages.")
@click.option("--interval", type=float, default=10.0, show_default=True, help="Seconds at each canary step.")
@click.option(
    "--repeats", type=click.IntRange(1), default=2, show_default=True, help="Times each new-fact question is asked."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "-v", "--verbose", is_flag=True, help="Show Ray's, DeepSpeed's, vLLM's and transformers' output here too."
)
@click.pass_context
def demo(
    ctx: click.Context, poison: bool, steps: str, interval: float, repeats: int, as_json: bool, verbose: bool
) -> None:
    """Run the whole loop on the embedded default and print a summary.

    JSON keys (also in $RAYLOOP_HOME/demo-summary.json): baseline and candidate
    {version, new_accuracy, known_accuracy, eval_split_accuracy}, gate {decision,
    reasons}, rollout {strategy, status, steps, timeline, requests,
    failed_requests, by_version}, traffic_before, production_version,
    pipeline_run, endpoint, dashboard, duration_s.

    Only the demo's own progress is printed: what Ray, DeepSpeed, vLLM and transformers write goes to
    $RAYLOOP_HOME/logs/demo-*.log (its last lines are shown if the demo fails; -v shows it all).
    """
    from rayloop.cluster import ensure_home
    from rayloop.demo import run as demo_run
    from rayloop.errors import ConfigError
    from rayloop.logs import library_output_to_file

    try:
        canary = [int(x) for x in steps.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--steps {steps!r} is not a comma-separated list of percentages like 25,50,100") from None
    s = settings(ctx)
    ensure_home(s)
    with library_output_to_file(s.home_path, "demo", verbose=verbose) as term:
        summary = demo_run.run_demo(
            s,
            poison=poison,
            quiet=as_json,
            repeats=repeats,
            canary_steps=canary,
            canary_interval_s=interval,
            console_file=term.out,
        )
    if as_json:
        print_json(summary)


# --- evaluation and pipeline -----------------------------------------------
@cli.command("eval")
@click.argument("ref")
@click.option("--against", default=None, help="Model to compare with (default: NAME@production).")
@click.option("--no-record", is_flag=True, help="Do not store the report and decision on the candidate.")
@click.option("--local", is_flag=True, help="Run the engines in this process instead of Ray Data actors.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.pass_context
def eval_cmd(ctx: click.Context, ref: str, against: str | None, no_record: bool, local: bool, as_json: bool) -> None:
    """Evaluate REF against production and apply the validation gate.

    JSON keys: candidate, production (each: model, sets{NAME: n, correct,
    accuracy, loss, perplexity, failures}, items, seconds), gate (decision,
    reasons, checks, policy), evaluated_at.
    """
    from rayloop import cluster
    from rayloop.evaluation.gate import run_gate

    s = settings(ctx)
    if not local:
        cluster.connect(s)
    report = run_gate(s, ref, against=against, record=not no_record, use_ray=not local)
    if as_json:
        print_json(report.to_json())
        if not report.accepted:
            ctx.exit(ExitCode.GATE_REJECTED)
        return
    from rich.table import Table

    t = Table("set", report.candidate.model, report.production.model)
    for name, r in report.candidate.sets.items():
        p = report.production.sets.get(name)
        t.add_row(name, f"{r.accuracy:.2f}", f"{p.accuracy:.2f}" if p is not None else "-")
    console().print(t)
    click.echo(f"gate: {report.gate.decision}: {'; '.join(report.gate.reasons)}")
    if not report.accepted:
        ctx.exit(ExitCode.GATE_REJECTED)


@cli.group(cls=Group)
def pipeline() -> None:
    """collect -> preprocess -> retrain -> register -> evaluate -> deploy."""


def _stage_printer(file: TextIO | None = None) -> Callable[[str, str, dict[str, Any]], None]:
    def show(stage: str, status: str, info: dict[str, Any]) -> None:
        extra = (
            info.get("error")
            or info.get("reason")
            or info.get("snapshot_id")
            or info.get("ref")
            or info.get("decision")
            or ""
        )
        click.echo(f"[{stage}] {status} {extra}".rstrip(), file=file)

    return show


def pipeline_exit_code(record: dict[str, Any]) -> ExitCode:
    """3 when the gate rejected the candidate, 4 when its rollout ended rolled back or aborted, else 0."""
    stages = record.get("stages") or {}
    evaluate = (stages.get("evaluate") or {}).get("output") or {}
    if evaluate.get("decision") not in (None, "accepted"):
        return ExitCode.GATE_REJECTED
    deploy = (stages.get("deploy") or {}).get("output") or {}
    if deploy.get("status") in ("rolled_back", "aborted"):
        return ExitCode.NOT_PROMOTED
    return ExitCode.OK


@pipeline.command("run")
@click.option("--config", "run_config", type=click.Path(dir_okay=False), help="Settings file for this run.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON.")
@click.option(
    "-v", "--verbose", is_flag=True, help="Show Ray's, DeepSpeed's, vLLM's and transformers' output here too."
)
@click.pass_context
def pipeline_run(ctx: click.Context, run_config: str | None, as_json: bool, verbose: bool) -> None:
    """Run (or resume) the pipeline once.

    Only the stages' progress is printed: what Ray, DeepSpeed, vLLM and transformers write goes to
    $RAYLOOP_HOME/logs/pipeline-*.log (its last lines are shown if a stage fails; -v shows it all).
    """
    from rayloop import cluster
    from rayloop.config import load_settings
    from rayloop.logs import library_output_to_file
    from rayloop.pipeline import run_pipeline

    s = load_settings(run_config) if run_config else settings(ctx)
    with library_output_to_file(s.home_path, "pipeline", verbose=verbose) as term:
        cluster.connect(s)
        record = run_pipeline(s, on_stage=None if as_json else _stage_printer(term.out))
    if as_json:
        print_json(record)
    code = pipeline_exit_code(record)
    if code != ExitCode.OK:
        ctx.exit(code)


@pipeline.command("watch")
@click.option("--max-runs", type=click.IntRange(1), default=None, help="Stop after this many runs.")
@click.pass_context
def pipeline_watch(ctx: click.Context, max_runs: int | None) -> None:
    """Run the pipeline whenever enough new feedback has arrived (pipeline.min_feedback)."""
    from rayloop import cluster
    from rayloop.pipeline import watch

    s = settings(ctx)
    cluster.connect(s)
    watch(s, on_stage=_stage_printer(), max_runs=max_runs, log=click.echo)


# --- serving -------------------------------------------------------------
@cli.command()
@click.option(
    "--model",
    "model_ref",
    required=True,
    help="NAME@REF from the registry (demo@3, demo@production), or NAME with --path.",
)
@click.option("--path", type=click.Path(exists=True, file_okay=False), help="Serve a local HF model directory instead.")
@click.option("--version", type=click.IntRange(1), help="Version number to report for --path (default 1).")
@click.option(
    "--app",
    "app_name",
    help="Serve application name (default: the app serving NAME, else serving.app_name if free, else NAME).",
)
@click.option("--no-wait", is_flag=True, help="Return once the config is applied, before replicas serve it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def serve(
    ctx: click.Context,
    model_ref: str,
    path: str | None,
    version: int | None,
    app_name: str | None,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Serve a model version (OpenAI API); run again with another version to upgrade in place.

    Several models share one endpoint: serve another model and clients pick it with the request's
    `model` field (its app also answers directly under /models/NAME); /v1/models lists them all.
    """
    import time

    from rayloop.serving.deploy import serve_model

    def progress(line: str) -> None:  # on stderr: stdout stays for the result (and --json)
        click.echo(f"  {time.strftime('%H:%M:%S')} {line}", err=True)

    s = settings(ctx)
    out = serve_model(
        s,
        model_ref,
        path=path,
        version=version,
        app_name=app_name,
        wait=not no_wait,
        progress=None if as_json else progress,
    )
    if as_json:
        print_json(out)
    else:
        was = f" (was v{out['upgraded_from']})" if out["upgraded_from"] else ""
        click.echo(
            f"{out['app']}: serving {out['model']}@v{out['version']}{was} at {out['url']} ({out['seconds']:.1f}s)"
        )
        if out.get("route_prefix") not in (None, "/", s.serving.route_prefix):
            click.echo(f"  model {out['model']!r} on that endpoint; directly at route {out['route_prefix']}")


@cli.command("console")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def console_cmd(ctx: click.Context, as_json: bool) -> None:
    """Start the web console on the cluster (a read-only Serve app: models, versions, lineage, rollouts with
    live traffic weights and per-slot charts, capture health) and print its URL. Behind the API keys."""
    from rayloop import cluster
    from rayloop.console.app import deploy_console
    from rayloop.serving.auth import load_key_hashes

    s = settings(ctx)
    cluster.connect(s)
    # The keys this shell knows (RAYLOOP_API_KEYS, serving.api_keys_file) go to the app as hashes, as with serve.
    url = deploy_console(s, sorted(load_key_hashes(s.serving)))
    if as_json:
        print_json({"app": s.monitoring.console_app_name, "url": url})
    else:
        click.echo(f"console: {url}")


@cli.command()
@click.argument("name")
@click.option(
    "--out", type=click.Path(file_okay=False), help="Directory for index.html (default: $RAYLOOP_HOME/reports/NAME)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def report(ctx: click.Context, name: str, out: str | None, as_json: bool) -> None:
    """Write an offline HTML report of NAME's loop: rollouts with their verdicts, per-version errors,
    latency and feedback, evaluation accuracy, lineage. Needs no cluster."""
    from rayloop.monitoring.report import build_report

    s = settings(ctx)
    path = build_report(s, name, out or s.home_path / "reports" / name)
    if as_json:
        print_json({"model": name, "report": str(path)})
    else:
        click.echo(f"report: {path}")


def _lazy_group(module: str, attr: str) -> Callable[[], click.Command]:
    def load() -> click.Command:
        import importlib

        command: click.Command = getattr(importlib.import_module(module), attr)
        return command

    return load


class _LazyCommand(click.Group):
    """A sub-group whose commands live in another module, imported when used."""

    def __init__(self, name: str, module: str, attr: str, help: str) -> None:
        super().__init__(name=name, help=help)
        self._loader = _lazy_group(module, attr)
        self._real: click.Group | None = None

    def _load(self) -> click.Group:
        if self._real is None:
            real = self._loader()
            assert isinstance(real, click.Group)
            self._real = real
        return self._real

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._load().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load().get_command(ctx, cmd_name)

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # `rayloop NAME --help` shows the real group's docstring (e.g. its --json keys).
        self._load().format_help_text(ctx, formatter)


def register_lazy(name: str, module: str, attr: str, help: str) -> None:
    cli.add_command(_LazyCommand(name, module, attr, help))


register_lazy("models", "rayloop.registry.cli", "models", "Model repository: versions, aliases, lineage.")


class _LazyLeaf(click.Command):
    """A top-level command that lives in another module, imported when it runs (or shows --help)."""

    def __init__(self, name: str, module: str, attr: str, help: str) -> None:
        super().__init__(name=name, help=help)
        self._loader = _lazy_group(module, attr)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        # The real command parses its own options; Group.invoke then calls ctx.command.invoke.
        return self._loader().make_context(info_name, args, parent=parent, **extra)


def register_lazy_command(name: str, module: str, attr: str, help: str) -> None:
    cli.add_command(_LazyLeaf(name, module, attr, help))


for _name, _attr, _help in (
    ("deploy", "deploy_cmd", "Roll a version out: rolling, blue-green, canary or shadow."),
    ("promote", "promote_cmd", "Promote the running rollout's new version now."),
    ("abort", "abort_cmd", "Abort the running rollout (traffic back to the old version)."),
    ("rollback", "rollback_cmd", "Roll back the running rollout, or production to 'previous'."),
    ("status", "status_cmd", "Versions, slots, weights, rollout step and live metrics."),
    ("undeploy", "undeploy_cmd", "Stop serving a model (its Serve app); the registry keeps its versions."),
):
    register_lazy_command(_name, "rayloop.rollout.cli", _attr, _help)
register_lazy("rollouts", "rayloop.rollout.cli", "rollouts", "Rollout history: list, and show one's timeline.")

register_lazy("data", "rayloop.data.cli", "data", "Interaction store -> training snapshots (Ray Data).")
register_lazy_command("train", "rayloop.training.cli", "train_cmd", "Fine-tune on a snapshot (Ray Train + DeepSpeed).")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="rayloop", standalone_mode=True)


if __name__ == "__main__":
    # `python -m rayloop.cli` runs this file as __main__, a second copy of the module: the
    # commands (registered on rayloop.cli.cli) and the --json output state live in rayloop.cli.
    from rayloop.cli import main as _main

    _main(sys.argv[1:])
