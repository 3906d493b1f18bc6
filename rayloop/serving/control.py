"""The one seam through which rayloop reads and changes what Ray Serve runs.

Serve moves replicas to a new ``user_config`` in place only on its declarative
path (a whole ``ServeDeploySchema`` applied through the dashboard's REST API or
the controller's ``deploy_apps``), and applying a document deletes every app it
does not list. So every change rayloop makes, whether ``rayloop serve`` or a
rollout step, is :meth:`Control.update`: read the declaratively deployed apps,
replace one, apply the whole document, under one lock held in the registry
database (so two controllers on two hosts never lose each other's change).
:class:`ServeControl` is that seam on a live cluster; :class:`InMemoryControl`
is the same seam over a list of app configs, for unit tests.

A cluster on which nobody has started Serve yet simply has no apps: reading it
never raises, and the first :meth:`ServeControl.apply` starts Serve with the
configured HTTP options. :func:`wait_for_state` is the one way to wait until an
applied layout serves.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rayloop.config import Settings
from rayloop.errors import ClusterError, LeaseLostError, ServingError
from rayloop.serving.app import AppState, read_state, slot_deployment_name
from rayloop.serving.protocol import ModelConfig
from rayloop.serving.routing import SLOTS, STABLE

if TYPE_CHECKING:
    from rayloop.registry.locks import HeldLock

AppBuilder = Callable[[dict[str, Any] | None], dict[str, Any]]
"""Given the deployed config of one app (None: not deployed), the config to deploy instead."""


class Control(Protocol):
    """What serving and rollouts need from Serve."""

    def apps(self) -> list[dict[str, Any]]:
        """Declaratively deployed apps (their deployed configs, ``name`` included); [] when Serve is not running."""

    def update(self, name: str, build: AppBuilder) -> dict[str, Any]:
        """Replace app ``name`` with ``build(its deployed config)``, keeping every other app; atomic against
        other controllers. Returns what was applied. Starts Serve first when needed."""

    def remove(self, name: str) -> bool:
        """Delete app ``name``, keeping every other app (atomic like :meth:`update`); False if it was not there."""


class InMemoryControl:
    """:class:`Control` over a list of app configs (unit tests); ``applied`` counts the updates."""

    def __init__(self, apps: list[dict[str, Any]] | None = None) -> None:
        self.deployed = list(apps or [])
        self.applied = 0

    def apps(self) -> list[dict[str, Any]]:
        return list(self.deployed)

    def update(self, name: str, build: AppBuilder) -> dict[str, Any]:
        mine = next((a for a in self.deployed if a["name"] == name), None)
        app = _built(build, mine, [a for a in self.deployed if a["name"] != name])
        self.deployed = [a for a in self.deployed if a["name"] != name] + [app]
        self.applied += 1
        return app

    def remove(self, name: str) -> bool:
        before = len(self.deployed)
        self.deployed = [a for a in self.deployed if a["name"] != name]
        self.applied += 1
        return len(self.deployed) < before

    def app(self, name: str) -> dict[str, Any]:
        return next(a for a in self.deployed if a["name"] == name)


def dashboard_url() -> str | None:
    """The Ray dashboard (Serve REST API) address from the environment, or None: use the driver's controller."""
    url = os.environ.get("RAY_DASHBOARD_ADDRESS") or os.environ.get("RAYLOOP_DASHBOARD_URL")
    if url:
        return url if "://" in url else f"http://{url}"
    return None


def _ray_token() -> str | None:
    """Ray's auth token where Ray itself looks (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text().strip() or None
    return None


def serve_rest(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to Serve's REST API on the dashboard (with the cluster's auth token when it has one)."""
    headers = {"Content-Type": "application/json"}
    token = _ray_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise ServingError(f"Serve REST API {method} {path} failed: HTTP {e.code}: {e.read()[:300]!r}") from None
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray dashboard at {url}: {e}") from None
    return json.loads(raw) if raw else None


def deploy_schema(settings: Settings, apps: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``ServeDeploySchema`` dict for ``apps`` (validated by Ray's own model)."""
    from ray.serve.schema import ServeDeploySchema

    doc = {
        "http_options": {"host": settings.serving.http_host, "port": settings.serving.http_port},
        "proxy_location": settings.serving.proxy_location,
        "applications": apps,
    }
    ServeDeploySchema.model_validate(doc)
    return doc


def deployed_apps(details: dict[str, Any]) -> list[dict[str, Any]]:
    """The deployed configs in a Serve details document (``GET /api/serve/applications/``)."""
    out = []
    for name, app in (details.get("applications") or {}).items():
        cfg = app.get("deployed_app_config")
        if cfg and app.get("status") != "DELETING":
            out.append({**cfg, "name": name})
    return out


def running_state(app: dict[str, Any]) -> AppState:
    """The :class:`AppState` of a deployed app. When its config names no version for the stable slot (a Serve
    config or KubeRay manifest that gives ``NAME@ALIAS``, resolved when Serve built the app), the version comes
    from the stable replicas themselves. Needs a connected Ray driver in that case."""
    state = read_state(app)
    args = app.get("args") or {}
    if state.slots.get(STABLE) is not None or not ("@" in str(args.get("model", "")) or args.get("path")):
        return state  # the config names the version, or the app was built with none (idle)
    cfg = stable_from_replicas(app["name"])
    return state if cfg is None else state.model_copy(update={"slots": {**state.slots, STABLE: cfg}})


def stable_from_replicas(app_name: str, asks: int = 6) -> ModelConfig | None:
    """The version the stable replicas of ``app_name`` serve (None: none loaded); raises when they disagree."""
    from ray import serve

    h = serve.get_deployment_handle(slot_deployment_name(STABLE), app_name)
    seen: set[ModelConfig] = set()
    for _ in range(asks):
        info = h.info.remote().result(timeout_s=30)
        if info.get("version") is not None:
            seen.add(
                ModelConfig(
                    model=info["model"], version=info["version"], fingerprint=info["fingerprint"], path=info.get("path")
                )
            )
    if len(seen) > 1:
        raise ServingError(
            f"the stable replicas of Serve app {app_name!r} serve different versions "
            f"({', '.join(sorted(f'v{c.version}' for c in seen))}) and its config names none",
            hint="Wait until Serve has finished starting the app (`serve status`), then try again.",
        )
    return next(iter(seen), None)


def _replica_state(replica: dict[str, Any]) -> str | None:
    """A replica's state as Serve's REST API spells it ("RUNNING"): the controller's own details (read without a
    dashboard) hold ``ReplicaState`` members, whose ``str()`` is "ReplicaState.RUNNING"."""
    state = replica.get("state")
    return None if state is None else str(getattr(state, "value", state))


def replica_placement(details: dict[str, Any], app_name: str) -> dict[str, list[dict[str, Any]]]:
    """slot -> its replicas as Serve's details report them: replica id, state, node id and IP."""
    app = (details.get("applications") or {}).get(app_name) or {}
    out: dict[str, list[dict[str, Any]]] = {}
    for slot in SLOTS:
        dep = (app.get("deployments") or {}).get(slot_deployment_name(slot)) or {}
        out[slot] = [
            {
                "replica": r.get("replica_id"),
                "state": _replica_state(r),
                "node_id": r.get("node_id"),
                "node_ip": r.get("node_ip"),
            }
            for r in dep.get("replicas") or []
        ]
    return out


def unplaced_replicas(details: dict[str, Any], app_name: str, slots: frozenset[str]) -> dict[str, str]:
    """Actor name -> state of ``slots``' replicas that never got a node (they wait for room)."""
    placed = (details.get("applications") or {}).get(app_name) or {}
    found: dict[str, str] = {}
    for slot in sorted(slots):
        dep = (placed.get("deployments") or {}).get(slot_deployment_name(slot)) or {}
        for r in dep.get("replicas") or []:
            if not r.get("node_id") and r.get("actor_name"):
                found[str(r["actor_name"])] = str(_replica_state(r))
    return found


def replica_versions(app_name: str, slot: str, replicas: int, *, tries: int = 0) -> dict[str, int | None]:
    """replica id -> the version it serves, for the running replicas of a slot that answer ``info`` within
    ``tries`` calls (default 4 per replica; Serve spreads calls, so a replica may be missed). Needs a Ray driver."""
    from ray import serve

    h = serve.get_deployment_handle(slot_deployment_name(slot), app_name)
    seen: dict[str, int | None] = {}
    for _ in range(tries or 4 * replicas):
        info = h.info.remote().result(timeout_s=10)
        if info.get("replica"):
            seen[info["replica"]] = None if info.get("parked") else info.get("version")
        if len(seen) >= replicas:
            break
    return seen


class ServeControl:
    """:class:`Control` on a live cluster: the dashboard REST API when its address is known, else this
    driver's Serve controller client (the same calls the REST API makes). Needs a connected Ray driver
    for the controller path."""

    def __init__(
        self,
        settings: Settings,
        *,
        url: str | None = None,
        lock: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.url = url if url is not None else dashboard_url()
        self._lock = lock or (lambda: serve_config_lock(settings))

    def update(self, name: str, build: AppBuilder) -> dict[str, Any]:
        with self._lock() as held:
            apps = self.apps()
            app = _built(
                build, next((a for a in apps if a["name"] == name), None), [a for a in apps if a["name"] != name]
            )
            self.apply([a for a in apps if a["name"] != name] + [app], check=lambda: _still_held(held))
            return app

    def remove(self, name: str, *, wait_s: float = 120.0) -> bool:
        """Remove app ``name`` from Serve's config and wait (up to ``wait_s``) until Serve has stopped it, so
        that nothing answers for it once this returns. False when no such app was deployed."""
        with self._lock() as held:
            apps = self.apps()
            if not any(a["name"] == name for a in apps):
                return False
            self.apply([a for a in apps if a["name"] != name], check=lambda: _still_held(held))
        deadline = time.monotonic() + wait_s
        while name in self._details().get("applications", {}):  # DELETING while its replicas drain
            if time.monotonic() > deadline:
                raise ServingError(
                    f"Serve app {name!r} was removed from the config but is still shutting down after {wait_s:.0f}s",
                    hint="Check `serve status`; its replicas may be stuck draining requests.",
                )
            time.sleep(0.5)
        return True

    def _details(self) -> dict[str, Any]:
        if self.url is not None:
            return dict(serve_rest(self.url, "GET", "/api/serve/applications/") or {})
        client = _controller_client(required=False)
        return {} if client is None else dict(client.get_serve_details())

    def apps(self) -> list[dict[str, Any]]:
        # (no Serve on the cluster yet: no details, nothing runs)
        return deployed_apps(self._details())

    def placement(self, app_name: str) -> dict[str, list[dict[str, Any]]]:
        """slot -> replicas of ``app_name`` with their node and state, and the version each running one serves
        (None: idle or parked; absent: it did not answer)."""
        placed = replica_placement(self._details(), app_name)
        for slot, reps in placed.items():
            running = [r for r in reps if r["state"] == "RUNNING"]
            if not running:
                continue
            try:
                versions = replica_versions(app_name, slot, len(running))
            except Exception:  # a replica that does not answer leaves its version unknown
                versions = {}
            for r in reps:
                if r["replica"] in versions:
                    r["version"] = versions[r["replica"]]
        return placed

    def unplaced(self, app_name: str, slots: frozenset[str]) -> dict[str, str]:
        """Actor name -> state of ``slots``' replicas that have no node yet."""
        return unplaced_replicas(self._details(), app_name, slots)

    def cancel_unplaced(self, app_name: str, slots: frozenset[str], settle_s: float = 3.0) -> list[str]:
        """Stop at once the replicas of released ``slots`` that Serve is stopping but that never got a node;
        returns their actor names. Serve stops such a replica gracefully: it asks an actor that was never
        created to shut down and force-kills it only after ``graceful_shutdown_timeout_s`` (30 s), and stops
        the slot's other old replicas, and frees their room, only after that (ray-project/ray#50426). A replica
        without a node never ran and holds no request. Waits up to ``settle_s`` for Serve to turn such replicas
        into stopping ones (never kills one it still wants). Needs a connected Ray driver."""
        import ray
        from ray.serve._private.constants import SERVE_NAMESPACE

        cancelled: list[str] = []
        deadline = time.monotonic() + settle_s
        while True:
            unplaced = self.unplaced(app_name, slots)
            for name in [n for n, state in unplaced.items() if state == "STOPPING" and n not in cancelled]:
                try:
                    ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
                except ValueError:
                    pass  # gone already
                cancelled.append(name)
            # Serve may not have turned an old replica that waits for room into a stopping one yet.
            if all(state == "STOPPING" for state in unplaced.values()) or time.monotonic() > deadline:
                return cancelled
            time.sleep(0.25)

    def apply(self, apps: list[dict[str, Any]], *, check: Callable[[], None] | None = None) -> None:
        """Replace Serve's whole config with ``apps``.

        ``check`` (the lock's) runs right before the config goes out, after everything else is prepared, and
        again right after: a holder that froze in between and lost the lock meanwhile may have overwritten
        its successor's config, which it reports as :class:`LeaseLostError` with ``stale_apply`` set (its
        caller repairs Serve from the registry).
        """
        doc = self.prepare(apps)
        if check is not None:
            check()
        self.put(doc)
        if check is not None:
            try:
                check()
            except LeaseLostError as e:
                raise LeaseLostError(
                    f"a Serve config went out after the lock was lost ({e}); it may have replaced a newer one",
                    hint="rayloop repairs Serve from the registry; `rayloop status --reconcile` does it by hand.",
                    stale_apply=True,
                ) from e

    def prepare(self, apps: list[dict[str, Any]]) -> dict[str, Any]:
        """The validated deploy document for ``apps``, and what must exist before replicas start."""
        from rayloop.serving.routing import routing_secret
        from rayloop.storage import Storage

        doc = deploy_schema(self.settings, apps)
        # The session-bucket key exists before any replica starts (they read it; see routing_secret).
        routing_secret(Storage(self.settings.storage_root, s3_endpoint=self.settings.storage.s3_endpoint))
        return doc

    def put(self, doc: dict[str, Any]) -> None:
        """Send a prepared deploy document to Serve (the one step after the lock's last check)."""
        if self.url is not None:
            # The dashboard starts Serve itself when the cluster has none yet.
            serve_rest(self.url, "PUT", "/api/serve/applications/", doc)
            return
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(doc)
        client = _controller_client(required=False)
        if client is None:
            from ray import serve

            sv = self.settings.serving
            serve.start(http_options={"host": sv.http_host, "port": sv.http_port}, proxy_location=sv.proxy_location)
            client = _controller_client(required=True)
        client.deploy_apps(schema)


@contextmanager
def serve_config_lock(settings: Settings) -> Iterator[HeldLock]:
    """Hold the cluster's Serve-config lock so read-modify-apply runs one at a time across hosts.

    The lock is a row with a lease in the registry database (:mod:`rayloop.registry.locks`), not an open
    transaction: a holder that freezes (SIGSTOP, a long pause) loses it after ``rollout.lease_s`` instead of
    blocking every registry writer, and checks its token right before it applies (:meth:`HeldLock.check`).
    """
    from rayloop.registry.locks import lease_lock
    from rayloop.registry.registry import database_url
    from rayloop.registry.sql import Database
    from rayloop.registry.tables import ensure_schema

    db = Database(database_url(settings))
    ensure_schema(db)
    ttl = settings.rollout.lease_s
    with lease_lock(db, SERVE_CONFIG_LOCK, ttl_s=ttl, wait_s=max(120.0, 4 * ttl)) as held:
        yield held


SERVE_CONFIG_LOCK = "serve-config"


def _built(build: AppBuilder, mine: dict[str, Any] | None, others: list[dict[str, Any]]) -> dict[str, Any]:
    """``build(mine)``; a new app gets a route no other app holds (another model's app: ``/models/NAME``)."""
    from rayloop.serving.peers import place_route

    app = build(mine)
    return app if mine is not None else place_route(app, others)


def _still_held(held: Any) -> None:
    """Right before an apply: the lock is still ours (a holder that froze past its lease stops here)."""
    check = getattr(held, "check", None)
    if check is not None:
        check()


def _controller_client(*, required: bool) -> Any:
    """Serve's controller client of this driver, or None when Serve is not running (``required=False``)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None and required:
        raise ClusterError(
            "Serve is not running on this Ray cluster and could not be started",
            hint="Check `ray status` and the head's logs (`rayloop up` starts a head).",
        )
    return client


def serve_proxy_url(settings: Settings) -> str:
    """The Serve HTTP proxy's root URL: as the running Serve was started (whoever started it chose the port),
    else as ``settings`` would start it."""
    client = _controller_client(required=False)
    if client is not None:
        opts = client.get_serve_details().get("http_options") or {}
        if opts.get("port"):
            host = opts.get("host") or "127.0.0.1"
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            return f"http://{host}:{opts['port']}"
    return f"http://{settings.serving.http_host}:{settings.serving.http_port}"


def describe_status(st: Any) -> str:
    """One line of an app's Serve status: the app's, then each deployment's replicas by state."""
    parts = [str(getattr(st.status, "value", st.status))]
    for name, dep in sorted(st.deployments.items()):
        states = getattr(dep, "replica_states", None) or {}
        named = sorted((str(getattr(s, "value", s)).lower(), n) for s, n in states.items() if n)
        counts = ", ".join(f"{n} {s}" for s, n in named)
        parts.append(f"{name}: {getattr(dep.status, 'value', dep.status)}" + (f" ({counts})" if counts else ""))
    return "; ".join(parts)


def wait_for_state(
    app_name: str,
    state: AppState,
    *,
    since: float,
    timeout_s: float,
    replicas: int,
    progress: Callable[[str], None] | None = None,
    check: Callable[[], None] | None = None,
    released: frozenset[str] = frozenset(),
    whole: bool = True,
) -> None:
    """Block until ``app_name`` runs ``state``: every slot's replicas serve its version (idle ones none) and
    every stable replica applies its route table. Needs a connected Ray driver.

    ``released``: slots on their way out (routed nothing in ``state``): neither their health nor their version
    is waited for. A rollback waits only for what it keeps: a canary that lost a node and cannot be placed
    again must not hold the way back.

    ``whole=False``: a kept slot need not have all its replicas, only its running ones must serve ``state``
    (at least one each, none still being reconfigured). A rollback's way back is done once no request
    reaches the new version: replicas of the stable slot that died with their node may be waiting for the
    room the released canary still holds, and Serve starts them again by itself once it is free.

    ``since``: when the config was applied (Serve's status must be at least that new); ``replicas``: replicas per
    active slot (each is asked twice as many times, so every replica is likely asked at least once);
    ``progress`` gets a line each time the app's status changes (which deployments, which replica states);
    ``check`` runs before every poll and may raise to stop waiting (a controller that lost its lease).
    """
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = "no status yet"
    shown = ""
    while time.monotonic() < deadline:
        if check is not None:
            check()
        st = serve.status().applications.get(app_name)
        if st is not None:
            last = f"{st.status}: {st.message}"[:500]
            if progress is not None and (line := describe_status(st)) != shown:
                shown = line
                progress(line)
            if st.status == "DEPLOY_FAILED":
                raise ServingError(f"Serve app {app_name!r} failed to deploy: {st.message}")
            gone = {slot_deployment_name(s) for s in released}
            kept = [d for name, d in st.deployments.items() if name not in gone]
            # The app's own status counts the released slots too: with some, their deployments' do instead.
            if whole:
                healthy = all(d.status == "HEALTHY" for d in kept) and (
                    st.status == "RUNNING" or (bool(released) and st.status in ("DEPLOYING", "UNHEALTHY"))
                )
            else:
                # Running replicas must all have applied the new config: none is still being reconfigured
                # (Serve reconfigures a slot's replicas a batch at a time, each UPDATING until it is done).
                settled = all(
                    _count(d.replica_states, "RUNNING") >= 1 and _count(d.replica_states, "UPDATING") == 0 for d in kept
                )
                healthy = settled and st.status in ("RUNNING", "DEPLOYING", "UNHEALTHY")
            if healthy and st.last_deployed_time_s >= since - 1 and _converged(app_name, state, replicas, released):
                return
        time.sleep(0.5)
    raise ServingError(
        f"Serve app {app_name!r} did not reach {state.summary()} within {timeout_s:.0f}s ({last})",
        hint="Check `serve status` and the replica logs; raise rollout.ready_timeout_s for slow engine starts.",
    )


def _count(replica_states: Mapping[Any, int], state: str) -> int:
    """Replicas in ``state`` (Serve keys them by its ``ReplicaState``, a ``str`` enum)."""
    return sum(n for s, n in replica_states.items() if s == state)


def _converged(app_name: str, state: AppState, replicas: int, released: frozenset[str] = frozenset()) -> bool:
    from ray import serve

    n = max(2, 2 * replicas)
    try:
        for slot in SLOTS:
            if slot in released:
                continue
            h = serve.get_deployment_handle(slot_deployment_name(slot), app_name)
            want = state.version(slot)
            for _ in range(n if want is not None or slot == STABLE else 2):
                info = h.info.remote().result(timeout_s=30)
                # An idle slot has no version, or a parked one (kept warm, routed nothing).
                got = None if info.get("parked") else info.get("version")
                if got != want:
                    return False
                if slot == STABLE and (info.get("table") or {}).get("epoch") != state.table.epoch:
                    return False
    except Exception:
        return False
    return True
