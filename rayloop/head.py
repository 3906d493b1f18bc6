"""The process ``rayloop up`` leaves running: it starts ``ray start --head --block`` and drains it on SIGTERM.

A SIGTERM (or SIGINT, SIGHUP) sent to this process (by ``rayloop down``, an init system, a container
runtime stopping its main process) first drains the cluster as ``rayloop down`` does, so nothing
captured is lost: Serve shuts down gracefully (every replica ships the capture rows it buffers), then
the capture writer writes what it holds. Only then does Ray stop. Ray runs in a process group of its own,
so a signal sent to this process's group does not stop Ray before the drain.

A signal sent to Ray's own processes bypasses the drain: rows the writer accepted are still in its
write-ahead log on that node (replayed by the next writer there), rows still in a replica's buffer (at
most ``CLIENT_SHIP_S``) are not. With systemd, use ``KillMode=mixed`` so only this process gets SIGTERM.

    python -m rayloop.head --address 127.0.0.1:6379 -- ray start --head --block ...
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
RAY_STOP_TIMEOUT_S = 60.0

log = logging.getLogger("rayloop.head")


def _stop_ray(proc: subprocess.Popen[bytes], timeout_s: float = RAY_STOP_TIMEOUT_S) -> None:
    """SIGTERM ``ray start --block`` (it stops its own children), then SIGKILL whatever is left of its group."""
    try:
        proc.terminate()
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(cmd: list[str], address: str, pid_file: str | None = None) -> int:
    """Run Ray's head command until it exits or a stop signal arrives; return the exit code. ``pid_file``
    gets Ray's PID (its process group), for ``rayloop down`` to clean up after a supervisor that was killed."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    proc = subprocess.Popen(cmd, start_new_session=True)
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(str(proc.pid))
    print(f"rayloop head: ray started (pid {proc.pid}); SIGTERM to pid {os.getpid()} drains, then stops it", flush=True)
    while not stop.is_set():
        if proc.poll() is not None:
            print(f"rayloop head: ray exited by itself with code {proc.returncode}", flush=True)
            return int(proc.returncode)
        stop.wait(0.5)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the drain short
    name = signal.Signals(received[0]).name
    print(f"rayloop head: {name}: draining Serve and the capture writer before Ray stops", flush=True)
    t0 = time.monotonic()
    try:
        from rayloop.cluster import drain
        from rayloop.config import load_settings

        drain(load_settings(), address)
    except Exception as e:  # drain logs its own problems; Ray must stop in any case
        print(f"rayloop head: drain failed ({type(e).__name__}: {e}); stopping Ray anyway", flush=True)
    print(f"rayloop head: drained in {time.monotonic() - t0:.1f}s; stopping Ray", flush=True)
    _stop_ray(proc)
    print("rayloop head: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayloop.head", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="GCS address of the head (host:port), for the drain")
    parser.add_argument("--pid-file", help="write Ray's PID here")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the `ray start --head --block` command")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the ray command after --")
    logging.basicConfig(level=logging.INFO, format="rayloop head: %(message)s")
    return run(cmd, args.address, args.pid_file)


if __name__ == "__main__":
    sys.exit(main())
