"""Long commands (``rayloop demo``, ``rayloop pipeline run``) show only rayloop's own progress.

Ray, Ray Data, Ray Train, DeepSpeed, vLLM and transformers write hundreds of lines to the terminal of
the process that drives them: Python logging, warnings, progress bars, and lines from C++ code and
child processes that never pass through Python. :func:`library_output_to_file` sends the process's own
stdout and stderr (file descriptors 1 and 2, so all of those) to ``$RAYLOOP_HOME/logs/NAME-TIME.log``
for the duration of a command, and hands rayloop a stream on the real terminal for its own lines.
When the command fails, the log's last lines are printed with its path; ``--verbose`` leaves the
terminal alone.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

TAIL_LINES = 30


@dataclass
class Terminal:
    """Where rayloop's own lines go while library output goes to ``log`` (None: not redirected)."""

    out: TextIO
    log: Path | None


def log_path(home: Path, name: str) -> Path:
    """``HOME/logs/NAME-YYYYmmdd-HHMMSS.log`` (a PID suffix keeps two commands started together apart)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return home / "logs" / f"{name}-{stamp}-{os.getpid()}.log"


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of ``path`` (decoded leniently: the log holds whatever libraries wrote)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


@contextmanager
def library_output_to_file(home: Path, name: str, *, verbose: bool = False) -> Iterator[Terminal]:
    """Redirect this process's stdout and stderr to a log file under ``home/logs`` for the block.

    Yields a :class:`Terminal` whose ``out`` writes to the real stdout (rayloop's progress and results).
    On an exception the log's last lines and its path go to the real stderr before it propagates.
    With ``verbose`` nothing is redirected.
    """
    if verbose:
        yield Terminal(out=sys.stdout, log=None)
        return
    path = log_path(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = io.TextIOWrapper(os.fdopen(os.dup(saved_out), "wb", buffering=0), write_through=True)
    restored = False

    def restore() -> None:
        nonlocal restored
        if restored:
            return
        restored = True
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for saved, fd in ((saved_out, 1), (saved_err, 2)):
            os.dup2(saved, fd)
            os.close(saved)

    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield Terminal(out=terminal, log=path)
        except BaseException:
            restore()
            lines = tail(path)
            if lines:
                print(f"--- last {len(lines)} lines of {path} ---", file=sys.stderr)
                print("\n".join(lines), file=sys.stderr)
                print("---", file=sys.stderr)
            raise
        finally:
            restore()
            terminal.close()
    if os.environ.get("RAYLOOP_DEBUG"):
        print(f"library output of this command: {path}", file=sys.stderr)
