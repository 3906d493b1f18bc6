"""A Ray cluster of several nodes on this machine that share nothing but the network.

The head is what a user starts with ``rayloop up`` (this process's Unix user, its own ``RAYLOOP_HOME`` in a
directory only that user can read); each worker node is ``ray start --address ...`` run as a Unix user of its
own, with its own home, temp dir and ``RAYLOOP_NODE_DIR``, so anything that still reads or writes a path on
the head fails there as it would across machines. Storage is ``s3://`` (moto's server) and the registry is
PostgreSQL: the only things the nodes share, as on a real cluster.

Each node advertises a custom resource named after it (``rl_head``, ``rl_w1``, ...) so a test can pin work
to a node, and ``pids()`` / ``kill()`` find a worker node's processes by its user: a killed node is every
process of that user, SIGKILLed, as when a machine goes away. Only processes this harness started run as
those users.

Needs root (to create the node users and run ``ray start`` as them), as CI has.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.integration.registry_servers import (
    S3_ENV,
    create_bucket,
    create_database,
    free_port,
    moto_s3_server,
    postgres_server,
)

REPO = Path(__file__).resolve().parents[2]
BUCKET = "rayloop-multinode"
USER_PREFIX = "rayloop-node"


def node_user(name: str) -> pwd.struct_passwd:
    """The Unix user a worker node runs as (created on first use; needs root)."""
    user = f"{USER_PREFIX}-{name}"
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise RuntimeError(
            f"the multi-node harness runs worker nodes as their own Unix users and user {user!r} does not "
            "exist: run the tests as root (as CI does), or create the user first (useradd --system {user})"
        )
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", user],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(user)


def _pids_of(uid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    out.append(int(entry))
            except FileNotFoundError:
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [p for p in roots if _alive(p)]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _sigkill_until_gone(find: Callable[[], list[int]], rounds: int = 5) -> list[int]:
    """SIGKILL what ``find`` returns, again while it returns any (a dying process may still fork); returns
    what is left."""
    for _ in range(rounds):
        pids = find()
        if not pids:
            return []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return find()


@dataclass
class WorkerNode:
    name: str
    user: pwd.struct_passwd
    root: Path
    resources: dict[str, float]
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "ray-start.log"

    @property
    def resource(self) -> str:
        return f"rl_{self.name}"

    def pids(self) -> list[int]:
        return _pids_of(self.user.pw_uid)

    def kill(self) -> None:
        """The machine goes away: every process of the node, SIGKILLed at once."""
        _sigkill_until_gone(self.pids)
        if self.proc is not None:
            self.proc.wait(30)


class MultiNodeCluster:
    """Head + worker nodes; CLI commands run as the head's user, in the head's working directory."""

    def __init__(self, root: Path, *, s3_endpoint: str, registry_url: str, head_cpus: int = 1) -> None:
        self.root = root
        self.head_dir = root / "head"
        self.head_dir.mkdir(mode=0o700, parents=True)
        self.s3_endpoint = s3_endpoint
        self.registry_url = registry_url
        self.ports = {k: free_port() for k in ("gcs", "dashboard", "agent", "metrics", "http")}
        self.config: dict[str, dict[str, Any]] = {
            "ray": {
                "port": self.ports["gcs"],
                "dashboard_port": self.ports["dashboard"],
                "dashboard_agent_port": self.ports["agent"],
                "metrics_export_port": self.ports["metrics"],
                "num_cpus": head_cpus,
                "resources": {"rl_head": 1},
                # The head keeps Ray's control state on its disk, so that it can die and come back.
                "gcs_storage_path": "gcs",
            },
            "storage": {"root": f"s3://{BUCKET}/rayloop", "s3_endpoint": s3_endpoint},
            "registry": {"url": registry_url},
            # Worker nodes are other Unix users: their proxies could not share the head's port here.
            "serving": {"http_port": self.ports["http"], "proxy_location": "HeadOnly"},
        }
        self.workers: dict[str, WorkerNode] = {}
        self.address = f"127.0.0.1:{self.ports['gcs']}"

    # -- the head's user --------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment of commands run on the head: its config, S3 credentials, no RAY_ADDRESS."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAYLOOP_")}
        env.update(S3_ENV)
        env["PYTHONPATH"] = str(REPO)
        return env

    def write_config(self, **sections: dict[str, Any]) -> None:
        for key, value in sections.items():
            self.config.setdefault(key, {}).update(value)
        (self.head_dir / "rayloop.yaml").write_text(yaml.safe_dump(self.config))

    def rayloop(
        self, *args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``rayloop ARGS`` on the head, in its working directory (``env``: variables to add, e.g. a setting)."""
        cmd = [sys.executable, "-m", "rayloop.cli", *args]
        out = subprocess.run(
            cmd, cwd=self.head_dir, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode != 0:
            raise AssertionError(f"rayloop {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
        return out

    def rayloop_json(self, *args: str, timeout: float = 300) -> Any:
        return json.loads(self.rayloop(*args, "--json", timeout=timeout).stdout)

    def up(self) -> subprocess.CompletedProcess[str]:
        """``rayloop up`` on the head (again after :meth:`kill_head`: the head then starts from its saved state)."""
        self.write_config()
        # Ray's GCS declares a node dead after 5 missed health checks, one every 3 s by default; one a second
        # here (a raylet that is killed refuses the check at once, a busy one still has 10 s to answer each).
        out = self.rayloop("up", timeout=240, env={"RAY_health_check_period_ms": "1000"})
        state = json.loads((self.head_dir / ".rayloop" / "cluster.json").read_text())
        assert state["address"] == self.address
        self.token = Path(state["auth_token_path"])
        return out

    def kill_head(self) -> None:
        """SIGKILL every process of the head (rayloop's supervisor and Ray's), as when its machine dies: nothing
        drains, nothing stops in order. Its disk stays (``$RAYLOOP_HOME``: the GCS state, the capture journal)."""
        home = self.head_dir / ".rayloop"
        roots = [json.loads((home / "cluster.json").read_text())["pid"], int((home / "ray-head.pid").read_text())]
        # Every process under the supervisor and Ray (Ray's workers included, whatever their process group).
        known = set(_descendants(roots))

        def live() -> list[int]:
            known.update(_descendants(sorted(known)))  # children forked meanwhile by those still alive
            return [p for p in sorted(known) if _alive(p)]

        left = _sigkill_until_gone(live)
        assert not left, f"the head's processes {left} outlived SIGKILL"
        # Gone for good, as on a machine that died: reaped too (this container's init reaps orphans lazily,
        # and `ray start` refuses to start while a defunct gcs_server of the old head is still listed).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in known):
            time.sleep(0.2)
        # The machine comes back with an empty /tmp, where Ray noted the last head's address. (Kept, it would
        # make `ray start --head` refuse: it takes the worker nodes' raylets, which name that address and
        # share this machine's process table only here, for a head still running.)
        Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)

    # -- worker nodes ------------------------------------------------------------------------------
    def add_worker(
        self, name: str, *, num_cpus: int = 2, resources: dict[str, float] | None = None, wait: bool = True
    ) -> WorkerNode:
        """Start worker node ``name`` (``wait``: until it has joined the cluster)."""
        user = node_user(name)
        node_root = self.root / name
        node_root.mkdir(mode=0o700, exist_ok=True)  # a node that comes back keeps its disk
        os.chown(node_root, user.pw_uid, user.pw_gid)
        # The cluster's token, handed to the node as a secret would be on a real cluster.
        token = node_root / "ray-auth-token"
        shutil.copyfile(self.token, token)
        os.chown(token, user.pw_uid, user.pw_gid)
        os.chmod(token, 0o600)
        if resources is None and name in self.workers:  # the node comes back as it was
            resources = {k: v for k, v in self.workers[name].resources.items() if k != f"rl_{name}"}
        node = WorkerNode(name, user, node_root, {f"rl_{name}": 1, **(resources or {})})
        (node_root / "tmp").mkdir(mode=0o700, exist_ok=True)
        os.chown(node_root / "tmp", user.pw_uid, user.pw_gid)
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(node_root),
            "LANG": "C.UTF-8",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAYLOOP_NODE_DIR": str(node_root / "rayloop"),
            # Its own temp directory, as a machine of its own has (Ray keeps lock files there: a /tmp shared
            # between the nodes' users would let one node's lock directory lock out the others).
            "TMPDIR": str(node_root / "tmp"),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "PYTHONPATH": str(REPO),
            **S3_ENV,
        }
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--block",
            f"--address={self.address}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(node.resources)}",
            f"--temp-dir={node_root / 'ray'}",
            f"--object-store-memory={256 * 1024 * 1024}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]
        with open(node.log, "wb") as log:
            node.proc = subprocess.Popen(
                ["runuser", "-u", user.pw_name, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], *cmd],
                cwd=node_root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers[name] = node
        if wait:
            self.wait_for_nodes()
        return node

    def probe(self, code: str) -> Any:
        """Run ``code`` as a Ray driver on the head (this process is attached to another cluster); it prints
        one JSON document last, which is returned."""
        script = "import json, ray; from rayloop.config import load_settings; from rayloop.cluster import connect; "
        out = subprocess.run(
            [sys.executable, "-c", script + "connect(load_settings()); " + code],
            cwd=self.head_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def serve_details(self) -> dict[str, Any]:
        """Serve's details (``GET /api/serve/applications/`` on the head's dashboard, with the cluster's token):
        a cheap look, for polling, where ``rayloop status`` would start a Ray driver each time."""
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['dashboard']}/api/serve/applications/",
            headers={"Authorization": f"Bearer {self.token.read_text().strip()}"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            details: dict[str, Any] = json.loads(r.read())
        return details

    def replicas(self, deployment: str, app: str = "rayloop") -> list[dict[str, Any]]:
        """The replicas of ``app``'s ``deployment`` as Serve's details show them (state, node_id, start_time_s)."""
        apps = self.serve_details().get("applications") or {}
        dep = ((apps.get(app) or {}).get("deployments") or {}).get(deployment) or {}
        return list(dep.get("replicas") or [])

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes: id and resources."""
        nodes: list[dict[str, Any]] = self.probe(
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"
        )
        return nodes

    def actors(self) -> list[dict[str, Any]]:
        """Actors, the dead ones too: name, class, state, node id (Ray's state API)."""
        actors: list[dict[str, Any]] = self.probe(
            "from ray.util.state import list_actors; "
            "print(json.dumps([{'name': a.name or '', 'class_name': a.class_name, 'state': a.state, "
            "'node_id': a.node_id} for a in list_actors(limit=10000)]))"
        )
        return actors

    def tasks(self) -> list[dict[str, Any]]:
        """Ray tasks (not actor methods) the cluster ran: name and node id (Ray's state API)."""
        tasks: list[dict[str, Any]] = self.probe(
            "from ray.util.state import list_tasks; "
            "print(json.dumps([{'name': t.name, 'node_id': t.node_id} for t in "
            "list_tasks(filters=[('type', '=', 'NORMAL_TASK')], limit=10000, detail=True)]))"
        )
        return tasks

    def diagnose(self) -> str:
        """What Serve and Ray say about where things are and what cannot be placed (for a failed wait)."""
        try:
            report: Any = self.probe(
                "from ray import serve; from ray._private.state import available_resources_per_node; "
                "st = serve.status(); "
                "print(json.dumps({'available': available_resources_per_node(), 'deployments': {"
                "f'{a}/{d}': {'status': str(ds.status), 'message': ds.message, "
                "'replicas': {str(k): v for k, v in ds.replica_states.items()}} "
                "for a, app in st.applications.items() for d, ds in app.deployments.items()}}))"
            )
        except AssertionError as e:
            return f"(diagnosis failed: {e})"
        return json.dumps(report, indent=1, default=str)

    def node_ids(self) -> dict[str, str]:
        """node name (head, w1, ...) -> Ray node id, from each node's own resource."""
        out = {}
        for n in self.nodes():
            for res in n["resources"]:
                if res.startswith("rl_") and res[3:] in ("head", *self.workers):
                    out[res[3:]] = n["id"]
        return out

    def wait_for_nodes(self, timeout: float = 120) -> None:
        want = {"head", *(n for n, w in self.workers.items() if w.proc and w.proc.poll() is None)}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(self.node_ids()) >= want:
                return
            for name, w in self.workers.items():
                if w.proc is not None and w.proc.poll() is not None:
                    raise AssertionError(f"node {name} exited: {w.log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for nodes {sorted(want)}; have {sorted(self.node_ids())}")

    def down(self) -> None:
        """Every process of the cluster SIGKILLed: the head's (as :meth:`kill_head`), then the worker nodes'. The
        cluster is thrown away with its disk, so nothing needs to stop in order (``rayloop down``, tested on
        one node, stops Serve's replicas one by one: 15 s more here)."""
        try:
            self.kill_head()
        except (OSError, KeyError, ValueError):  # the head never fully started: let rayloop find what there is
            self.rayloop("down", timeout=180, check=False)
        finally:
            for node in self.workers.values():
                node.kill()


@contextmanager
def install_reachable_by_other_users() -> Iterator[None]:
    """Let other users run this Python and import rayloop (o+x on the directories above them), as every node of
    a real cluster has the same image; restored after. Nothing becomes readable that was not: the directories
    only become traversable."""
    paths = {Path(os.path.realpath(sys.executable)), Path(sys.executable), REPO / "rayloop"}
    changed: list[tuple[Path, int]] = []
    for path in paths:
        for d in path.parents:
            mode = d.stat().st_mode & 0o7777
            if not mode & 0o001:
                changed.append((d, mode))
                os.chmod(d, mode | 0o001)
    try:
        yield
    finally:
        for d, mode in reversed(changed):
            os.chmod(d, mode)


@contextmanager
def multinode_cluster(
    root: Path, workers: dict[str, dict[str, Any]], *, head_cpus: int = 1
) -> Iterator[MultiNodeCluster]:
    """Start S3, PostgreSQL, the head and ``workers`` (name -> add_worker kwargs); stop all of it after."""
    with ExitStack() as stack:
        saved = {k: os.environ.get(k) for k in S3_ENV}
        os.environ.update(S3_ENV)  # this process reads the cluster's storage too (the tests check it)
        stack.callback(
            lambda: [os.environ.pop(k, None) if v is None else os.environ.update({k: v}) for k, v in saved.items()]
        )
        stack.enter_context(install_reachable_by_other_users())
        endpoint = stack.enter_context(moto_s3_server())
        create_bucket(endpoint, BUCKET)
        pg = stack.enter_context(postgres_server())
        cluster = MultiNodeCluster(
            root, s3_endpoint=endpoint, registry_url=create_database(pg, "rayloop_multinode"), head_cpus=head_cpus
        )
        os.chmod(root, 0o755)  # worker users reach their own directories under it, nothing of the head's
        try:
            cluster.up()
            for name, kwargs in workers.items():  # they join together, as a cluster's first workers do
                cluster.add_worker(name, **kwargs, wait=False)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            cluster.down()
