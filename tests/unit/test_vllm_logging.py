"""vLLM's logging setup must not silence Serve's replica log (nor, through it, break a Serve controller's
recovery of the replica after the head came back: test_multinode.py's head restart)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# In a process of its own: vLLM's dictConfig closes every logging handler of the process it runs in.
SCRIPT = """
import logging, logging.handlers, sys
from rayloop.serving.vllm_engine import serve_log_kept
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging

log = logging.getLogger("ray.serve")
log.propagate = False
buffer = logging.handlers.MemoryHandler(1, target=logging.handlers.RotatingFileHandler(sys.argv[1]))
log.addHandler(buffer)
log.warning("before vLLM")
if sys.argv[2] == "kept":
    with serve_log_kept():
        configure_logging(LoggingConfig())
else:
    configure_logging(LoggingConfig())
log.warning("after vLLM")
print("target", buffer.target is not None)
"""


def _run(tmp_path: Path, mode: str) -> tuple[str, str]:
    log = tmp_path / f"{mode}.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1], log.read_text()


def test_vllms_logging_setup_closes_serves_log_and_the_engine_start_puts_it_back(tmp_path: Path) -> None:
    target, text = _run(tmp_path, "bare")
    assert target == "target False" and "before vLLM" in text and "after vLLM" not in text  # what vLLM does
    target, text = _run(tmp_path, "kept")
    assert target == "target True" and "before vLLM" in text and "after vLLM" in text
