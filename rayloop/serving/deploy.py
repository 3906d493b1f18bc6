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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayloop.config import Settings
from rayloop.errors import ConfigError, ServingError
from rayloop.serving import checkpoint, golden
from rayloop.serving.app import STABLE_SLOT, ServeArgs, engine_actor_options, slot_deployment_name
from rayloop.serving.control import Control, ServeControl
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


@dataclass
class DeployResult:
    app: str
    model: str
    version: int
    upgraded_from: int | None
    seconds: float
    replicas: list[dict[str, Any]]


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
    control: Control | None = None,
) -> DeployResult:
    """Deploy ``cfg``'s version, or move a running app to it in place. Needs a connected Ray driver.

    On a cluster where Serve is not running yet, the apply starts it.
    """
    name = app_name or settings.serving.app_name
    t0 = time.monotonic()
    control = control or ServeControl(settings)
    current = control.apps()
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
    control.apply(apps)
    replicas: list[dict[str, Any]] = []
    if wait:
        wait_for_version(name, cfg, timeout_s=timeout_s, since=since)
        replicas = _replica_infos(name, 2 * settings.serving.replicas)
    return DeployResult(name, cfg.model, cfg.version, previous, time.monotonic() - t0, replicas)
