"""What every ``rayloop`` command shares: settings, ``--json`` output, errors and exit codes.

Sub-command modules (``rayloop/*/cli.py``) import these public names; they parse, call the library and
print, nothing more.

Exit codes, the same with and without ``--json``:

====  =====================================================================
 0    done
 1    error: a rayloop error (``Type: message`` and a hint on stderr)
 2    usage: a bad flag, argument or command (click's usage error)
 3    the validation gate rejected the candidate (``rayloop eval``, ``pipeline run``)
 4    a rollout ended rolled back or aborted (``deploy``, ``promote``, ``abort``, ``rollback``, ``pipeline run``)
====  =====================================================================
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import click

from rayloop.errors import RayloopError


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    GATE_REJECTED = 3
    NOT_PROMOTED = 4


# Where _print_json writes: the real stdout while a `--json` command runs with
# everything else (library logs, progress) sent to stderr.
_results: TextIO | None = None


@contextlib.contextmanager
def _stdout_for_results_only() -> Iterator[None]:
    """Send every other write to stdout, including C-level ones (vLLM, Ray, DeepSpeed), to stderr."""
    global _results
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        fd = None  # not a real file (click's CliRunner): swapping the Python object is enough
    if fd is None:
        saved_obj = sys.stdout
        _results, sys.stdout = saved_obj, sys.stderr
        try:
            yield
        finally:
            sys.stdout, _results = saved_obj, None
        return
    saved_fd = os.dup(fd)
    os.dup2(sys.stderr.fileno(), fd)
    _results = os.fdopen(os.dup(saved_fd), "w")
    try:
        yield
    finally:
        # Ray prints its workers' and raylet's log lines on the driver's stdout from a background thread,
        # whenever they arrive: disconnect before stdout is the result channel again.
        _disconnect_ray()
        sys.stdout.flush()
        _results.close()
        _results = None
        os.dup2(saved_fd, fd)
        os.close(saved_fd)


def _disconnect_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


class Group(click.Group):
    """Turns rayloop errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]
        json_mode = ctx.parent is None and "--json" in args and not {"-h", "--help"} & set(args)
        try:
            with _stdout_for_results_only() if json_mode else contextlib.nullcontext():
                return super().invoke(ctx)
        except RayloopError as e:
            if os.environ.get("RAYLOOP_DEBUG") == "1":
                raise
            click.echo(f"{type(e).__name__}: {e.message}", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            ctx.exit(ExitCode.ERROR)


def settings(ctx: click.Context) -> Any:
    """The settings of this invocation (``--config``, ``rayloop.yaml``, the environment), loaded once."""
    from rayloop.config import load_settings

    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        obj["settings"] = load_settings(obj.get("config_path"))
    return obj["settings"]


def print_json(data: Any) -> None:
    """Write ``data`` as JSON on stdout: under ``--json`` the only thing written there."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str), file=_results)
    if _results is not None:
        _results.flush()


def console() -> Any:
    """A rich console on stdout, for tables."""
    from rich.console import Console

    return Console(stderr=False)


@contextlib.contextmanager
def byte_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr for work measured in bytes (hashing, copying); yields the callback to call with
    each chunk's byte count, from any thread. Drawn only when stderr is a terminal (never into a pipe or log)."""
    import threading

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    err = Console(stderr=True)
    if not err.is_terminal or total <= 0:
        yield lambda n: None
        return
    lock = threading.Lock()
    with Progress(
        TextColumn(description),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int) -> None:
            with lock:
                bar.advance(task, n)

        yield advance
