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
from typing import Any

import click

from rayloop.errors import RayloopError

EXIT_USER_ERROR = 1


class _Group(click.Group):
    """Turns rayloop errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RayloopError as e:
            if os.environ.get("RAYLOOP_DEBUG") == "1":
                raise
            click.echo(f"{type(e).__name__}: {e.message}", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            ctx.exit(EXIT_USER_ERROR)


def _settings(ctx: click.Context) -> Any:
    from rayloop.config import load_settings

    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        obj["settings"] = load_settings(obj.get("config_path"))
    return obj["settings"]


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="Settings file (default: ./rayloop.yaml)."
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """rayloop: keep a served LLM improving from its own traffic, on Ray."""
    ctx.ensure_object(dict)["config_path"] = config_path


# --- config --------------------------------------------------------------
@cli.group(cls=_Group)
def config() -> None:
    """Inspect settings."""


@config.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the resolved settings as JSON."""
    _print_json(_settings(ctx).dump())


# --- cluster -------------------------------------------------------------
@cli.command()
@click.pass_context
def up(ctx: click.Context) -> None:
    """Start a local Ray head that outlives this command (or report the running one)."""
    from rayloop import cluster

    s = _settings(ctx)
    state = cluster.up(s)
    click.echo(f"Ray head running (pid {state.pid}) at {state.address}; dashboard {state.dashboard_url}")


@cli.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop the local Ray head that `rayloop up` started (and everything on it)."""
    from rayloop import cluster

    if cluster.down(_settings(ctx)):
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
@click.option("--force", is_flag=True, help="Rebuild even if the directory holds a model.")
@click.option("--json", "as_json", is_flag=True, help="Print build info as JSON.")
@click.pass_context
def init(ctx: click.Context, out: str | None, steps: int | None, seed: int, force: bool, as_json: bool) -> None:
    """Build the demo world and tiny base model locally (no downloads)."""
    from rayloop.demo import setup

    s = _settings(ctx)
    info = setup.init_base_model(s, out=out, steps=steps, seed=seed, force=force, show_progress=not as_json)
    if as_json:
        _print_json(info)
    else:
        click.echo(f"Base model in {info['model_dir']} (final loss {info['final_loss']:.3f}).")


@cli.command()
@click.option("--poison", is_flag=True, help="Users give wrong corrections: the gate must reject the candidate.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def demo(ctx: click.Context, poison: bool, as_json: bool) -> None:
    """Run the whole loop on the embedded default and print a summary."""
    from rayloop.demo import run as demo_run

    summary = demo_run.run_demo(_settings(ctx), poison=poison, quiet=as_json)
    if as_json:
        _print_json(summary)


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


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="rayloop", standalone_mode=True)


if __name__ == "__main__":
    main(sys.argv[1:])
