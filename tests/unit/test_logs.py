"""`rayloop demo` and `rayloop pipeline run` keep library output off the terminal: everything the process
writes to its stdout/stderr (Python logging, warnings, C-level writes, child processes) lands in a log file
under $RAYLOOP_HOME/logs; rayloop's own lines reach the terminal; a failure shows the log's last lines."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent(
    """
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from rayloop.logs import library_output_to_file

    home, fail, verbose = Path(sys.argv[1]), sys.argv[2] == "fail", sys.argv[3] == "verbose"
    print("before", flush=True)
    with library_output_to_file(home, "demo", verbose=verbose) as term:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("ray.data").info("ray data line")
        warnings.warn("a library warning")
        print("library print to stdout", flush=True)
        os.write(2, b"c-level write to fd 2\\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
        print("rayloop progress", file=term.out)
        if fail:
            raise RuntimeError("stage failed")
    print("after", flush=True)
    """
)
LIBRARY_LINES = (
    "ray data line",
    "a library warning",
    "library print to stdout",
    "c-level write",
    "child out",
    "child err",
)


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), *args], capture_output=True, text=True, timeout=60
    )


def test_library_output_goes_to_the_log_and_rayloop_lines_to_the_terminal(tmp_path: Path) -> None:
    r = _run(tmp_path, "ok", "quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["before", "rayloop progress", "after"]
    assert r.stderr == ""
    (log,) = (tmp_path / "logs").glob("demo-*.log")
    text = log.read_text()
    assert all(line in text for line in LIBRARY_LINES), text
    assert "rayloop progress" not in text


def test_a_failure_shows_the_last_lines_and_the_log_path(tmp_path: Path) -> None:
    r = _run(tmp_path, "fail", "quiet")
    assert r.returncode == 1 and "RuntimeError: stage failed" in r.stderr
    (log,) = (tmp_path / "logs").glob("demo-*.log")
    assert "--- last " in r.stderr and str(log) in r.stderr
    shown = r.stderr.split(" ---\n", 1)[1].split("\n---\n", 1)[0]  # the tail, printed before the traceback
    assert "child err" in shown and "c-level write to fd 2" in shown
    assert "after" not in r.stdout


def test_verbose_leaves_the_terminal_alone(tmp_path: Path) -> None:
    r = _run(tmp_path, "ok", "verbose")
    assert r.returncode == 0, r.stderr
    assert "library print to stdout" in r.stdout and "rayloop progress" in r.stdout
    assert "c-level write to fd 2" in r.stderr and "child err" in r.stderr
    assert not (tmp_path / "logs").exists()
