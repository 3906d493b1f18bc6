"""Throwaway servers for registry integration tests: PostgreSQL and an S3 endpoint (moto).

Both start on a free localhost port, write their data under a fresh temporary
directory, and are stopped by PID (never by name) when the context exits.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now that this process has not handed out before: callers pick several before any is bound
    (a Ray head's GCS, dashboard and agent ports), and the kernel may offer a port just released again."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


# -- PostgreSQL ------------------------------------------------------------------
def postgres_bin_dir() -> Path | None:
    """Directory with initdb and postgres: /usr/lib/postgresql/<newest>/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and Path(initdb).resolve().with_name("postgres").exists():
        return Path(initdb).resolve().parent
    return None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Run a private PostgreSQL; yield ``postgresql://postgres@127.0.0.1:PORT/postgres``.

    initdb refuses to run as root, so as root the server runs as the
    ``postgres`` OS user (its data directory is handed over to it).
    """
    bindir = postgres_bin_dir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (no initdb found); run scripts/ci_postgres.sh to install it")
    workdir = Path(tempfile.mkdtemp(prefix="rayloop-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    data, log = workdir / "data", workdir / "server.log"
    subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        cwd=workdir,
        **run_as,
    )
    port = free_port()
    args = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(workdir), "-h", "127.0.0.1"]
    for setting in (
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
        "shared_buffers=16MB",
        "max_connections=60",
    ):
        args += ["-c", setting]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, **run_as)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not accept connections: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        _stop(proc, signal.SIGINT)  # SIGINT = fast shutdown
        shutil.rmtree(workdir, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server; return its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


# -- S3 (moto server) ------------------------------------------------------------
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """Run moto's S3-compatible server; yield its endpoint ``http://127.0.0.1:PORT``."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        exe = Path(shutil.which("moto_server") or "moto_server")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="rayloop-moto-"))
    log = workdir / "moto.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=logf, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=S3_ENV["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket=bucket)
