"""Deploy or upgrade the serving app through Serve's declarative path.

Serve moves replicas to a new ``user_config`` in place (``reconfigure``, one
replica at a time, no traffic to the one being changed) only when a config is
applied with unchanged ``import_path``, ``args`` and ``runtime_env``: what
``serve deploy`` and the dashboard REST API do. ``serve.run`` instead restarts
every replica. So :func:`deploy` builds a ``ServeDeploySchema`` in which only
the ``llm-stable`` deployment's ``user_config`` carries the version, merges it
with the other declaratively deployed apps (applying a config deletes apps it
does not list), and applies it through the REST API when a dashboard address
is known, else through the Serve controller (the same call the REST API makes).

Before an upgrade it makes sure a fresh engine's golden answers for the new
version are recorded, so replicas can verify their in-place swap.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayloop.config import Settings
from rayloop.errors import ClusterError, ConfigError, ServingError
from rayloop.serving import checkpoint, golden
from rayloop.serving.app import STABLE_SLOT, ServeArgs, engine_actor_options, slot_deployment_name
from rayloop.serving.protocol import ModelConfig, parse_ref
from rayloop.storage import Storage

IMPORT_PATH = "serve_apps.llm:build_app"


def resolve_version(settings: Settings, ref: str) -> ModelConfig:
    """``NAME@REF`` -> the :class:`ModelConfig` of that registry version."""
    parse_ref(ref)
    try:
        from rayloop.registry import Registry
    except ImportError as e:
        raise ConfigError(
            f"cannot resolve {ref!r}: the registry is not available ({e})", hint="Pass --path DIR."
        ) from None
    mv = Registry.from_settings(settings).resolve(ref)  # bare NAME means its production alias
    return ModelConfig(model=mv.name, version=mv.version, fingerprint=mv.fingerprint)


def model_config_for_path(name: str, path: str | Path, version: int) -> ModelConfig:
    """A :class:`ModelConfig` for a local directory (checked and fingerprinted now)."""
    p = str(Path(path).expanduser().absolute())
    checkpoint.check_model_dir(p)
    return ModelConfig(model=name, version=version, fingerprint=checkpoint.fingerprint(p), path=p)


def app_config(
    settings: Settings,
    cfg: ModelConfig,
    *,
    app_name: str | None = None,
    api_key_hashes: list[str] | None = None,
    engine_cls: str | None = None,
) -> dict[str, Any]:
    """One ``ServeApplicationSchema`` entry; only ``user_config`` varies between versions."""
    args = ServeArgs(
        model=cfg.model, settings=settings, api_key_hashes=sorted(api_key_hashes or []), engine_cls=engine_cls
    )
    return {
        "name": app_name or settings.serving.app_name,
        "route_prefix": settings.serving.route_prefix,
        "import_path": IMPORT_PATH,
        "args": args.model_dump(mode="json", exclude_none=True),
        "deployments": [{"name": slot_deployment_name(STABLE_SLOT), "user_config": cfg.user_config()}],
    }


def deploy_schema(settings: Settings, apps: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``ServeDeploySchema`` dict (validated by Ray's own model)."""
    from ray.serve.schema import ServeDeploySchema

    doc = {
        "http_options": {"host": settings.serving.http_host, "port": settings.serving.http_port},
        "applications": apps,
    }
    ServeDeploySchema.model_validate(doc)
    return doc


@dataclass
class DeployResult:
    app: str
    model: str
    version: int
    upgraded_from: int | None
    seconds: float
    replicas: list[dict[str, Any]]


def dashboard_url(settings: Settings) -> str | None:
    """The Ray dashboard (Serve REST API) address from the environment, or None: use the driver's controller."""
    url = os.environ.get("RAY_DASHBOARD_ADDRESS") or os.environ.get("RAYLOOP_DASHBOARD_URL")
    if url:
        return url if "://" in url else f"http://{url}"
    return None


def serve_rest(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to Serve's REST API on the dashboard (with the cluster's auth token when it has one)."""
    headers = {"Content-Type": "application/json"}
    token_file = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE") != "disabled" and token_file.is_file():
        # Ray 2.60 local clusters require their token on REST calls.
        headers["Authorization"] = f"Bearer {token_file.read_text().strip()}"
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


def current_apps(url: str | None) -> list[dict[str, Any]]:
    """Declaratively deployed apps (their deployed configs), so applying ours keeps them."""
    if url is not None:
        details = serve_rest(url, "GET", "/api/serve/applications/")
    else:
        details = _controller_client().get_serve_details()
    out = []
    for name, app in (details.get("applications") or {}).items():
        cfg = app.get("deployed_app_config")
        if cfg and app.get("status") != "DELETING":
            out.append({**cfg, "name": name})
    return out


def apply_apps(url: str | None, doc: dict[str, Any]) -> None:
    """Apply a whole ``ServeDeploySchema`` document declaratively (the path that calls ``reconfigure``)."""
    if url is not None:
        serve_rest(url, "PUT", "/api/serve/applications/", doc)
        return
    from ray.serve.schema import ServeDeploySchema

    _controller_client().deploy_apps(ServeDeploySchema.model_validate(doc))


def _controller_client() -> Any:
    """Serve's controller client of this driver (what the dashboard REST API calls into)."""
    from ray.serve._private.api import _get_global_client

    client = _get_global_client()
    if client is None:
        raise ClusterError(
            "Serve is not running on this Ray cluster", hint="Start it with `serve.start()` or `rayloop serve`."
        )
    return client


def ensure_golden(settings: Settings, cfg: ModelConfig, *, engine_cls: str | None = None) -> golden.GoldenRecord:
    """The golden record of ``cfg``'s version; recorded by a fresh engine in a Ray task if missing."""
    import ray

    storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
    es = settings.serving.engine
    fp = cfg.fingerprint
    if fp is not None and (rec := golden.load_golden(storage, fp, es)) is not None:
        return rec
    opts = engine_actor_options(settings)
    task = ray.remote(_record_golden).options(**opts)
    result: golden.GoldenRecord = ray.get(task.remote(settings.dump(), cfg.model_dump(), engine_cls))
    return result


def _record_golden(
    settings_dict: dict[str, Any], cfg_dict: dict[str, Any], engine_cls: str | None
) -> golden.GoldenRecord:
    import asyncio

    from rayloop.serving.server import load_engine_cls, resolve_model_dir

    settings = Settings.model_validate(settings_dict)
    cfg = ModelConfig.model_validate(cfg_dict)

    async def run() -> golden.GoldenRecord:
        model_dir = resolve_model_dir(cfg, settings)
        checkpoint.check_model_dir(model_dir, expected_fingerprint=cfg.fingerprint if cfg.path else None)
        fp = cfg.fingerprint or checkpoint.fingerprint(model_dir)
        engine = load_engine_cls(engine_cls)()
        await engine.start(model_dir, settings.serving.engine, [cfg.served_id, cfg.model])
        try:
            rec = await golden.record(engine, fp, settings.serving.engine, "record")
        finally:
            await engine.shutdown()
        storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
        golden.save_golden(storage, rec, settings.serving.engine)
        return rec

    return asyncio.run(run())


def _replica_infos(app_name: str, n: int) -> list[dict[str, Any]]:
    """Ask the engine deployment ``n`` times (requests spread over replicas)."""
    from ray import serve

    h = serve.get_deployment_handle(slot_deployment_name(STABLE_SLOT), app_name)
    return [h.info.remote().result(timeout_s=30) for _ in range(n)]


def wait_for_version(app_name: str, cfg: ModelConfig, *, timeout_s: float, since: float) -> None:
    """Block until the app is RUNNING with every engine replica on ``cfg``'s version."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        st = serve.status().applications.get(app_name)
        if st is not None:
            last = f"{st.status}: {st.message}"
            if st.status == "DEPLOY_FAILED":
                raise ServingError(f"deploying {cfg.served_id} to app {app_name!r} failed: {st.message}")
            dep = st.deployments.get(slot_deployment_name(STABLE_SLOT))
            if (
                st.status == "RUNNING"
                and st.last_deployed_time_s >= since - 1
                and dep is not None
                and dep.status == "HEALTHY"
            ):
                n = sum(dep.replica_states.values()) if dep.replica_states else 1
                infos = _replica_infos(app_name, max(2, 2 * n))
                if all(i["version"] == cfg.version and i["model"] == cfg.model for i in infos):
                    return
        time.sleep(1.0)
    raise ServingError(f"app {app_name!r} did not reach {cfg.served_id} within {timeout_s:.0f}s (last status {last})")


def deploy(
    settings: Settings,
    cfg: ModelConfig,
    *,
    app_name: str | None = None,
    api_key_hashes: list[str] | None = None,
    engine_cls: str | None = None,
    record_golden: bool = True,
    wait: bool = True,
    timeout_s: float = 600,
) -> DeployResult:
    """Deploy ``cfg``'s version, or move a running app to it in place. Needs a connected Ray driver."""
    from ray import serve

    name = app_name or settings.serving.app_name
    t0 = time.monotonic()
    url = dashboard_url(settings)
    current = current_apps(url)
    mine = next((a for a in current if a["name"] == name), None)
    previous: int | None = None
    if mine is not None:
        for d in mine.get("deployments", []):
            if d.get("name") == slot_deployment_name(STABLE_SLOT) and d.get("user_config"):
                previous = int(d["user_config"].get("version", 0)) or None
        if mine.get("import_path") != IMPORT_PATH:
            from rayloop.rollout.app import ROUTER_IMPORT_PATH

            if mine.get("import_path") == ROUTER_IMPORT_PATH:
                raise ServingError(
                    f"app {name!r} runs the rayloop router (rollouts), so `rayloop serve` does not change it",
                    hint=f"Move it with the rollout controller: `rayloop deploy {cfg.model}@{cfg.version} "
                    "--strategy rolling` (or canary, blue-green, shadow).",
                )
            raise ServingError(
                f"app {name!r} is not a rayloop serving app (import_path {mine.get('import_path')!r})",
                hint="Pick another --app name, or delete that app first with `serve delete`.",
            )
    if mine is not None and record_golden:
        # An upgrade: replicas verify their in-place swap against a fresh engine's answers.
        ensure_golden(settings, cfg, engine_cls=engine_cls)
    new_app = app_config(settings, cfg, app_name=name, api_key_hashes=api_key_hashes, engine_cls=engine_cls)
    if mine is not None and mine.get("args") != new_app["args"]:
        # Changed args would restart every replica instead of reconfiguring them.
        raise ServingError(
            f"app {name!r} runs with other args (settings, model name or API keys differ); an in-place upgrade needs equal args",
            hint="Use the same settings as the running app, or delete it first with `serve delete`.",
        )
    apps = [a for a in current if a["name"] != name] + [new_app]
    since = time.time()
    if mine is None:
        serve.start(http_options={"host": settings.serving.http_host, "port": settings.serving.http_port})
    apply_apps(url, deploy_schema(settings, apps))
    replicas: list[dict[str, Any]] = []
    if wait:
        wait_for_version(name, cfg, timeout_s=timeout_s, since=since)
        replicas = _replica_infos(name, 2 * settings.serving.replicas)
    return DeployResult(name, cfg.model, cfg.version, previous, time.monotonic() - t0, replicas)
