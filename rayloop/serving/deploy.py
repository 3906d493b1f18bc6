"""``rayloop serve``: deploy a version, or move the running app's stable slot to another in place.

It writes the same app layout the rollout controller moves
(:mod:`rayloop.serving.app`), through the same Serve seam
(:mod:`rayloop.serving.control`), so whatever `rayloop serve` starts, every
strategy of `rayloop deploy` can move, and the other way round. An upgrade is a
change of the stable deployment's ``user_config`` only, which Serve applies in
place (``reconfigure``, one replica at a time, no traffic to the one being
changed); before it, a fresh engine's golden answers for the new version are
recorded, so replicas can verify their in-place swap. An app in the middle of
a rollout is left to its controller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rayloop.config import Settings
from rayloop.errors import ConfigError, ServingError
from rayloop.serving import checkpoint, golden
from rayloop.serving.app import (
    IMPORT_PATH,
    AppState,
    ServeArgs,
    app_config,
    engine_actor_options,
    idle_state,
    parked_slots,
    slot_deployment_name,
)
from rayloop.serving.control import Control, ServeControl, running_state, wait_for_state
from rayloop.serving.protocol import ModelConfig, parse_ref
from rayloop.serving.routing import STABLE, RouteTable
from rayloop.storage import Storage


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


@dataclass
class DeployResult:
    app: str
    model: str
    version: int
    upgraded_from: int | None
    seconds: float
    replicas: list[dict[str, Any]]
    route_prefix: str | None = None  # where the app answers directly (another model's app: /models/NAME)


def ensure_golden(
    settings: Settings, cfg: ModelConfig, *, engine_cls: str | None = None, timeout_s: float | None = None
) -> golden.GoldenRecord:
    """The golden record of ``cfg``'s version; recorded by a fresh engine in a Ray task if missing.

    The task needs an engine replica's resources. ``timeout_s`` bounds the wait (default
    ``rollout.ready_timeout_s``): on a cluster with no room for it (a node died), the task is cancelled and
    a ServingError says so, instead of waiting for room without end.
    """
    import ray
    from ray.exceptions import GetTimeoutError

    storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
    es = settings.serving.engine
    fp = cfg.fingerprint
    if fp is not None and (rec := golden.load_golden(storage, fp, es)) is not None:
        return rec
    limit = settings.rollout.ready_timeout_s if timeout_s is None else timeout_s
    opts = engine_actor_options(settings)
    ref = ray.remote(_record_golden).options(**opts).remote(settings.dump(), cfg.model_dump(), engine_cls)
    try:
        result: golden.GoldenRecord = ray.get(ref, timeout=limit)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        raise ServingError(
            f"recording the golden answers of {cfg.model} v{cfg.version} (a fresh engine, which in-place swaps "
            f"are verified against) did not finish within {limit:.0f}s; the task asks for {opts}",
            hint="Check `ray status` for room on the cluster (a node may have died); raise "
            "rollout.ready_timeout_s for slow engine starts.",
        ) from None
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


def replica_infos(app_name: str, n: int) -> list[dict[str, Any]]:
    """Ask the stable deployment ``n`` times (requests spread over replicas)."""
    from ray import serve

    h = serve.get_deployment_handle(slot_deployment_name(STABLE), app_name)
    return [h.info.remote().result(timeout_s=30) for _ in range(n)]


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
    progress: Callable[[str], None] | None = None,
) -> DeployResult:
    """Deploy ``cfg``'s version, or move a running app's stable slot to it in place.

    Needs a connected Ray driver; on a cluster where Serve is not running yet, the apply starts it.
    """
    from rayloop.serving.peers import app_for_model

    t0 = time.monotonic()
    control = control or ServeControl(settings)
    apps = control.apps()
    # Without --app: the app serving this model, else the configured one if free, else one named after it.
    sv = settings.serving
    name = app_name or app_for_model(apps, cfg.model, sv.app_name, sv.route_prefix)
    args = ServeArgs(
        model=cfg.model, settings=settings, api_key_hashes=sorted(api_key_hashes or []), engine_cls=engine_cls
    )
    running = next((a for a in apps if a["name"] == name), None)
    if running is not None:
        _check_upgrade(name, running, cfg, args)
        if record_golden:
            # An upgrade: replicas verify their in-place swap against a fresh engine's answers.
            ensure_golden(settings, cfg, engine_cls=engine_cls, timeout_s=timeout_s)
    plan: dict[str, Any] = {}

    def build(mine: dict[str, Any] | None) -> dict[str, Any]:
        """The app to apply, from what is deployed now (checked again: it may have changed meanwhile)."""
        if mine is None:
            state = idle_state(cfg.model, cfg, RouteTable(versions={STABLE: cfg.version}, epoch=1))
            plan.update(state=state, previous=None, settings=settings)
            return app_config(settings, args, state, app_name=name)
        cur = _check_upgrade(name, mine, cfg, args)
        table = cur.table.model_copy(update={"versions": {STABLE: cfg.version}, "epoch": cur.table.epoch + 1})
        state = cur.model_copy(update={"slots": {**cur.slots, STABLE: cfg}, "table": table})
        plan.update(state=state, previous=cur.version(STABLE), settings=args.settings)
        keep = parked_slots(mine) if args.settings.rollout.keep_warm_slots else {}
        app = app_config(args.settings, args, state, app_name=name, parked=keep)
        app["route_prefix"] = mine.get("route_prefix", app["route_prefix"])
        return app

    since = time.time()
    applied = control.update(name, build)
    previous: int | None = plan["previous"]
    replicas: list[dict[str, Any]] = []
    if wait:
        n = plan["settings"].serving.max_replicas
        wait_for_state(name, plan["state"], since=since, timeout_s=timeout_s, replicas=n, progress=progress)
        replicas = replica_infos(name, 2 * n)
    return DeployResult(
        name, cfg.model, cfg.version, previous, time.monotonic() - t0, replicas, applied.get("route_prefix")
    )


def _check_upgrade(name: str, mine: dict[str, Any], cfg: ModelConfig, args: ServeArgs) -> AppState:
    """The running app's state, if `rayloop serve` may move its stable slot to ``cfg`` in place; else why not."""
    if mine.get("import_path") != IMPORT_PATH:
        raise ServingError(
            f"app {name!r} is not a rayloop serving app (import_path {mine.get('import_path')!r})",
            hint="Pick another --app name, or delete that app first with `serve delete`.",
        )
    cur = running_state(mine)
    if cur.model != cfg.model:
        raise ServingError(
            f"app {name!r} serves model {cur.model!r}, not {cfg.model!r}",
            hint="Serve the other model under its own --app name.",
        )
    if not cur.lean:
        raise ServingError(
            f"app {name!r} is in the middle of a rollout ({cur.summary()}); `rayloop serve` leaves it to its "
            "controller",
            hint=f"See `rayloop status`; finish it with `rayloop promote {cfg.model}` or `rayloop abort "
            f"{cfg.model}`, then serve again.",
        )
    new = args.model_dump(mode="json", exclude_none=True)
    if mine.get("args") != new:
        # Changed args would restart every replica instead of reconfiguring them.
        changed = [_ARG_NAMES.get(c, c.removeprefix("settings.")) for c in args_changed(mine.get("args") or {}, new)]
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ServingError(
            f"app {name!r} runs with other settings than this `rayloop serve` would give it ({shown} differ): "
            "an in-place upgrade keeps the app's settings, and changing them restarts every replica",
            hint=f"Put those settings back as the running app has them, or stop the app first (`serve delete "
            f"{name}`) and serve again with the new ones.",
        )
    return cur


_ARG_NAMES = {"api_key_hashes": "the API keys", "model": "the model reference", "engine_cls": "the engine class"}


def args_changed(running: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of what differs between two apps' args (``settings.serving.replicas``); values are not
    shown (some are secrets' hashes)."""
    out: list[str] = []
    for key in sorted(set(running) | set(new)):
        a, b = running.get(key), new.get(key)
        if a == b:
            continue
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += args_changed(a, b, f"{path}.")
        else:
            out.append(path)
    return out


def model_config(settings: Settings, model_ref: str, path: str | None, version: int | None) -> ModelConfig:
    name, ref = parse_ref(model_ref)
    if path is not None:
        if ref is not None and not ref.isdigit():
            raise ConfigError(f"--path serves a local directory; give --model NAME or NAME@N, not {model_ref!r}")
        return model_config_for_path(name, path, version or (int(ref) if ref else 1))
    if version is not None:
        raise ConfigError("--version only goes with --path; for registry versions use --model NAME@N")
    return resolve_version(settings, model_ref)


def serve_model(
    settings: Settings,
    model_ref: str,
    *,
    path: str | None = None,
    version: int | None = None,
    app_name: str | None = None,
    wait: bool = True,
    timeout_s: float = 600,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Deploy ``model_ref`` on the configured cluster (upgrading the app in place if it runs)."""
    from rayloop import cluster
    from rayloop.serving.auth import check_auth_policy, load_key_hashes

    # Keys are hashed here, so the Serve config (visible in the dashboard) never holds them.
    hashes = sorted(load_key_hashes(settings.serving))
    check_auth_policy(settings.serving, hashes)
    cfg = model_config(settings, model_ref, path, version)
    cluster.connect(settings)
    if progress is not None:
        progress(f"applying {cfg.served_id}" + (f" to app {app_name!r}" if app_name else ""))
    res = deploy(
        settings, cfg, app_name=app_name, api_key_hashes=hashes, wait=wait, timeout_s=timeout_s, progress=progress
    )
    out = asdict(res)
    out["url"] = f"{settings.serving.base_url}/v1"
    return out
