"""Start, find and stop the Ray cluster rayloop runs on.

``rayloop up`` starts a local head that outlives the CLI: a small supervisor
(:mod:`rayloop.head`, in a session of its own) that runs ``ray start --head
--block`` and, on SIGTERM, drains Serve and the capture writer before Ray
stops. It records the supervisor's PID and the address in
``$RAYLOOP_HOME/cluster.json``; ``rayloop down`` sends that PID SIGTERM and
waits, then makes sure nothing of either process group is left.

With ``ray.gcs_storage_path`` the head keeps Ray's control state on disk: a
head that died (not one ``rayloop down`` stopped) and is started again with
``rayloop up`` carries on, with its worker nodes, Serve's apps and its
detached actors.

When ``RAY_ADDRESS`` (or ``ray.address`` in settings) is set, rayloop
attaches to that cluster instead and never stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rayloop.config import Settings
from rayloop.errors import ClusterError

STATE_FILE = "cluster.json"
TOKEN_FILE = "ray-auth-token"
RAY_PID_FILE = "ray-head.pid"
STOP_TIMEOUT_S = 240.0  # drain (Serve's graceful shutdown, a capture flush) plus Ray's own stop


@dataclass
class ClusterState:
    pid: int
    address: str
    dashboard_url: str
    temp_dir: str
    started_at: float
    auth_token_path: str | None = None  # Ray token auth is on when set (state files from before it: off)
    supervised: bool = False  # pid is rayloop.head's, which drains on SIGTERM (older state files: ray's own)
    gcs_storage_path: str | None = None  # the GCS's RocksDB directory (ray.gcs_storage_path); None: in memory
    recovered: bool = False  # this head started from the state a head before it left there (it had died)

    def auth_env(self) -> dict[str, str]:
        """The variables a Ray client (``ray.init``, ``ray job submit``) needs to talk to this head."""
        if self.auth_token_path:
            return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.auth_token_path}
        return {"RAY_AUTH_MODE": "disabled"}

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _zombie(self.pid)  # a head that died and is not reaped yet is gone all the same


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits for its parent to reap it (Linux's /proc; elsewhere: no)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# rayloop's home holds the embedded storage and registry, logs, the capture journal, Ray's control state and
# its auth token: nothing to commit, and nothing `ray job submit --working-dir .` may pack up from the directory
# it is in (Ray skips what .gitignore and .rayignore name). Packed, every job would upload all of it, more each
# time, and a file written while Ray hashes the directory twice gives the job a package that was never uploaded.
HOME_IGNORE = "# rayloop's state: not for git, nor for a Ray job's working_dir (rayloop writes this file)\n*\n"


def ensure_home(settings: Settings) -> Path:
    """Create ``$RAYLOOP_HOME`` if needed, with ``.gitignore`` and ``.rayignore`` files that leave all of it out
    of git and of Ray job packages (files already there are left as they are)."""
    home = settings.home_path
    home.mkdir(parents=True, exist_ok=True)
    for name in (".gitignore", ".rayignore"):
        path = home / name
        if not path.exists():
            path.write_text(HOME_IGNORE)
    return home


def _state_path(settings: Settings) -> Path:
    return settings.home_path / STATE_FILE


def gcs_storage_dir(settings: Settings) -> Path | None:
    """Where the head keeps its GCS state (``ray.gcs_storage_path``, relative to ``$RAYLOOP_HOME``), or None."""
    if not settings.ray.gcs_storage_path:
        return None
    path = Path(settings.ray.gcs_storage_path).expanduser()
    return path if path.is_absolute() else settings.home_path / path


def read_state(settings: Settings) -> ClusterState | None:
    p = _state_path(settings)
    if not p.is_file():
        return None
    try:
        return ClusterState(**json.loads(p.read_text()))
    except (ValueError, TypeError):
        return None


def _ray_bin() -> str:
    cand = Path(sys.executable).with_name("ray")
    return str(cand) if cand.exists() else "ray"


def _port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _wait_for_gcs(address: str, log: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import socket

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise ClusterError(f"`ray start` exited with code {proc.returncode} before the head came up:\n{tail}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                pass
            # The GCS port opens before the dashboard and raylet are ready; wait for the line ray prints last.
            if log.exists() and "Ray runtime started" in log.read_text():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise ClusterError(f"Ray head did not come up within {timeout:.0f}s; see {log}")


def use_auth(env: dict[str, str]) -> None:
    """Put Ray auth variables in this process's environment and make Ray read them again (it caches its
    config and token when ``ray`` is imported)."""
    os.environ.update(env)
    if env.get("RAY_AUTH_MODE") != "token":
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]
    except ImportError:  # an older Ray without token auth: nothing cached
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def write_prometheus_config(settings: Settings) -> Path:
    """``$RAYLOOP_HOME/monitoring/prometheus.yml``: a scrape config for the head ``up`` starts, with rayloop's
    alert rules and Grafana dashboard beside it (:mod:`rayloop.monitoring.assets`).

    It scrapes the head's fixed metrics port (``ray.metrics_export_port``), where Ray, Serve, vLLM and
    rayloop export. Ray's service-discovery file (``<temp dir>/prom_metrics_service_discovery.json``) is
    not used: it is one file per machine, rewritten by whichever cluster started last, so it can name
    another cluster's ports; it is for clusters of several machines, where each has one head.
    """
    import yaml

    from rayloop.monitoring.assets import RULES_FILE, write_files

    interval = f"{settings.monitoring.scrape_interval_s:g}s"
    doc = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [RULES_FILE],
        "scrape_configs": [
            {
                "job_name": "ray",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{settings.ray.metrics_export_port}"], "labels": {"cluster": "rayloop"}}
                ],
            }
        ],
    }
    directory = settings.home_path / "monitoring"
    write_files(directory)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ensure_auth_token(settings: Settings) -> Path:
    """``$RAYLOOP_HOME/ray-auth-token``, created (owner-only) with a new random token if it is missing."""
    path = settings.home_path / TOKEN_FILE
    if not (path.is_file() and path.read_text().strip()):
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{TOKEN_FILE}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_new_authentication_token())
        os.replace(tmp, path)
    os.chmod(path, 0o600)
    return path.absolute()


def up(settings: Settings, timeout: float = 300.0) -> ClusterState:
    """Start a local Ray head that outlives this process, or return the running one."""
    if settings.ray.address:
        raise ClusterError(
            f"ray.address is set to {settings.ray.address!r}: rayloop attaches to that cluster and does not start one",
            hint="Unset RAY_ADDRESS (or ray.address in rayloop.yaml) to start a local cluster.",
        )
    state = read_state(settings)
    if state and state.alive():
        return replace(state, recovered=False)  # already running: nothing was recovered by this call
    home = ensure_home(settings)
    port = settings.ray.port
    agent_port = settings.ray.dashboard_agent_port
    if _port_in_use(settings.ray.dashboard_host, agent_port):
        # Ray would start anyway, with a dashboard agent that never registers: every `ray job submit`
        # then fails with "No available agent to submit job". Refuse up front instead.
        raise ClusterError(
            f"port {agent_port} (ray.dashboard_agent_port) is already in use, most likely by the dashboard "
            "agent of another Ray cluster on this machine",
            hint="Stop that cluster, or set ray.dashboard_agent_port in rayloop.yaml to a free port.",
        )
    temp_dir = "/tmp/ray"  # ray start default; session logs live there
    log = home / "ray-head.log"
    cmd = [
        _ray_bin(),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--num-cpus={settings.ray.num_cpus}",
        f"--num-gpus={settings.ray.num_gpus}",
        f"--object-store-memory={settings.ray.object_store_memory_mb * 1024 * 1024}",
        "--include-dashboard=true",
        f"--dashboard-host={settings.ray.dashboard_host}",
        f"--dashboard-port={settings.ray.dashboard_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--metrics-export-port={settings.ray.metrics_export_port}",
        "--disable-usage-stats",
    ]
    if settings.ray.resources:
        cmd.append(f"--resources={json.dumps(settings.ray.resources)}")
    token = ensure_auth_token(settings) if settings.ray.auth == "token" else None
    env = head_env(settings, token=token)
    # The supervisor (rayloop.head) drains Serve and the capture writer before it signals Ray. Ray's own
    # SIGTERM drain would then wait its whole timeout (30 s) for a node that never goes idle, since detached
    # actors (the capture writer) keep their workers; set the variable to keep Ray's drain anyway.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    store = gcs_storage_dir(settings)
    recovered = False
    if store is not None:
        # Ray's GCS reads and writes its tables there; the session name it keeps there makes a head started
        # again join the same session, so worker nodes reconnect to it and detached actors come back.
        store.mkdir(parents=True, exist_ok=True)
        recovered = (store / "session_name").is_file()
        env["RAY_gcs_storage"] = "rocksdb"
        env["RAY_gcs_storage_path"] = str(store)
    address = f"127.0.0.1:{port}"
    pid_file = home / RAY_PID_FILE
    pid_file.unlink(missing_ok=True)
    head = [sys.executable, "-m", "rayloop.head", "--address", address, "--pid-file", str(pid_file), "--", *cmd]
    with open(log, "wb") as out:
        proc = subprocess.Popen(head, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        _wait_for_gcs(address, log, proc, timeout)
    except ClusterError:
        _kill_group(proc.pid)
        _kill_ray_group(home)
        raise
    write_prometheus_config(settings)
    state = ClusterState(
        pid=proc.pid,
        address=address,
        dashboard_url=f"http://{settings.ray.dashboard_host}:{settings.ray.dashboard_port}",
        temp_dir=temp_dir,
        started_at=time.time(),
        auth_token_path=None if token is None else str(token),
        supervised=True,
        gcs_storage_path=None if store is None else str(store),
        recovered=recovered,
    )
    _state_path(settings).write_text(json.dumps(asdict(state), indent=1))
    return state


def head_env(settings: Settings, environ: dict[str, str] | None = None, *, token: Path | None = None) -> dict[str, str]:
    """The environment of the head `rayloop up` starts, which its jobs (``ray job submit``) inherit.

    A job's ``python`` is this environment's (rayloop's venv first on ``PATH``), and its settings find this
    head's storage and registry (absolute ``RAYLOOP_HOME``, ``RAYLOOP_STORAGE``, ``RAYLOOP_REGISTRY_URL``)
    whatever its working directory: a relative ``.rayloop`` would otherwise resolve under the job's own.
    With ``token``, Ray's token authentication is on (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``).
    """
    env = dict(os.environ if environ is None else environ)
    env.pop("RAY_AUTH_TOKEN", None)
    if token is None:
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN_PATH", None)
    else:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        env["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    env["RAYLOOP_HOME"] = str(settings.home_path)
    root = settings.storage_root
    env["RAYLOOP_STORAGE"] = root if "://" in root else str(Path(root).expanduser().absolute())
    env["RAYLOOP_REGISTRY_URL"] = settings.registry_url
    return env


def _kill_group(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM ``pid`` (the supervisor drains and stops Ray; ``ray start --block`` tears down its own
    children), wait up to ``timeout`` for its process group to end, then SIGKILL what is left of it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_ray_group(home: Path) -> None:
    """SIGKILL what is left of Ray's process group (after its supervisor ended or was killed)."""
    path = home / RAY_PID_FILE
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    path.unlink(missing_ok=True)


def down(settings: Settings) -> bool:
    """Stop the head that ``up`` started. Returns False when there was none.

    Before the processes stop, Serve is shut down gracefully (each replica ships the capture rows it
    holds) and the capture writer writes everything it buffers: nothing recorded is lost to ``down``.
    The supervisor does that on the SIGTERM ``down`` sends it (as on any SIGTERM); a head started
    before the supervisor existed is drained from here.
    """
    state = read_state(settings)
    if state is None:
        return False
    if state.alive() and not state.supervised:
        drain(settings, state.address)
    _kill_group(state.pid, timeout=STOP_TIMEOUT_S if state.supervised else 30.0)
    _kill_ray_group(settings.home_path)
    if state.gcs_storage_path:
        # A stopped cluster starts empty next time; only a head that died comes back with its state.
        shutil.rmtree(state.gcs_storage_path, ignore_errors=True)
    _state_path(settings).unlink(missing_ok=True)
    return True


def drain(settings: Settings, address: str, timeout_s: float = 120.0) -> None:
    """Best effort before a head stops: Serve's graceful shutdown, then a final capture flush (logged, never
    raised: ``down`` must stop the head even when the cluster is unhealthy)."""
    import logging

    log = logging.getLogger("rayloop")
    try:
        import ray

        if not ray.is_initialized():
            state = read_state(settings)
            if state is not None and state.address == address:
                use_auth(state.auth_env())
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address=address, log_to_driver=False)
        try:
            from ray import serve

            shutdown: Callable[[], None] = serve.shutdown  # (Ray's function carries no annotations)
            shutdown()  # replicas' graceful shutdown closes their capture clients (rows shipped)
        except Exception as e:
            log.warning("rayloop down: Serve did not shut down cleanly (%s)", e)
        try:
            from rayloop.data.capture import NAMESPACE, writer_name

            writer = ray.get_actor(writer_name(settings.storage_root), namespace=NAMESPACE)
            ray.get(writer.flush.remote(), timeout=timeout_s)
        except ValueError:
            pass  # no writer: nothing was captured
        except Exception as e:
            log.warning("rayloop down: the capture writer did not flush (%s)", e)
        ray.shutdown()
    except Exception as e:
        log.warning("rayloop down: could not drain the cluster first (%s)", e)


def address_for(settings: Settings) -> str:
    """The address to attach to: settings/RAY_ADDRESS, else the head ``up`` started."""
    if settings.ray.address:
        return settings.ray.address
    state = read_state(settings)
    if state and state.alive():
        return state.address
    raise ClusterError("no Ray cluster is running for this RAYLOOP_HOME")


def connect(settings: Settings, **init_kwargs: Any) -> Any:
    """``ray.init`` against the cluster rayloop runs on (never starts one)."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address_for(settings)
    state = None if settings.ray.address else read_state(settings)
    if state is not None:
        use_auth(state.auth_env())  # the head `rayloop up` started: its token, whatever the caller set
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_kwargs.setdefault("log_to_driver", False)
    return ray.init(address=address, **init_kwargs)
