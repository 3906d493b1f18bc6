"""The router application: ``RouterIngress`` over three ``LLMServer`` slots.

``serve_apps/router.py:build_app`` hands off to :func:`build_router_app`, so
Serve YAML ``args:`` and the rollout controller go through the same
:class:`~rayloop.serving.app.ServeArgs` as the plain serving app.

Deployments (names in the Serve config):

- ``llm-stable``, ``llm-canary``, ``llm-shadow``: an active slot has the
  engine's resources and a ``user_config`` naming its version; an *idle* slot
  has one replica with a token CPU share and no ``user_config``, so it loads
  no engine. Going active or idle changes ``ray_actor_options``, which makes
  Serve replace that slot's replica (a fresh engine, or the engine's memory
  given back); version changes of an active slot stay in-place ``user_config``
  updates. With ``rollout.keep_warm_slots`` a released slot is *parked*
  instead: it keeps the engine's resources and its version (``parked: true``
  in its ``user_config``), the router sends it nothing, and the next rollout's
  version reaches that engine as an in-place ``user_config`` update.
- ``Router``: its ``user_config`` is the :class:`~rayloop.rollout.routing.RouteTable`.

The controller never changes ``args``, ``import_path`` or ``runtime_env`` of a
running app: those would restart every replica.
"""

from __future__ import annotations

from typing import Any

from rayloop.config import Settings
from rayloop.rollout.routing import SLOTS, STABLE, RouteTable
from rayloop.serving.protocol import ModelConfig

ROUTER_IMPORT_PATH = "serve_apps.router:build_app"
ROUTER_DEPLOYMENT = "Router"
IDLE_NUM_CPUS = 0.01


def slot_deployment(slot: str) -> str:
    from rayloop.serving.app import slot_deployment_name

    return slot_deployment_name(slot)


def slot_options(settings: Settings, slot: str, cfg: ModelConfig | None) -> dict[str, Any]:
    """The Serve config entry of one slot: active (``cfg``) or idle (None)."""
    from rayloop.serving.app import engine_actor_options

    if cfg is None:
        return {"name": slot_deployment(slot), "num_replicas": 1, "ray_actor_options": {"num_cpus": IDLE_NUM_CPUS}}
    out: dict[str, Any] = {
        "name": slot_deployment(slot),
        "num_replicas": settings.serving.replicas,
        "ray_actor_options": engine_actor_options(settings),
        "user_config": cfg.user_config(),
    }
    es = settings.serving.engine
    if es.accelerator == "gpu":
        out["placement_group_bundles"] = [{"CPU": settings.serving.replica_num_cpus}] + [
            {"GPU": 1}
        ] * es.tensor_parallel_size
        out["placement_group_strategy"] = "STRICT_PACK"
    return out


def router_options(table: RouteTable) -> dict[str, Any]:
    return {"name": ROUTER_DEPLOYMENT, "user_config": table.model_dump(mode="json")}


def build_router_app(args: Any) -> Any:
    """The Serve application for ``args`` (a :class:`~rayloop.serving.app.ServeArgs` or its dict)."""
    from ray import serve

    from rayloop.rollout.router import RouterIngress
    from rayloop.serving.app import ServeArgs, check_app_auth, engine_actor_options, initial_user_config
    from rayloop.serving.server import LLMServer

    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    s = a.settings
    check_app_auth(a)
    es = s.serving.engine
    settings_dict = s.dump()
    handles: dict[str, Any] = {}
    for slot in SLOTS:
        opts: dict[str, Any] = {
            "name": slot_deployment(slot),
            "max_ongoing_requests": s.serving.max_ongoing_requests,
            "max_queued_requests": s.serving.max_queued_requests,
            # Engine start and golden prompts take tens of seconds on CPU.
            "health_check_timeout_s": 120,
            "graceful_shutdown_timeout_s": 30,
        }
        if slot == STABLE:
            opts["num_replicas"] = s.serving.replicas
            opts["ray_actor_options"] = engine_actor_options(s)
            if es.accelerator == "gpu":
                opts["placement_group_bundles"] = [{"CPU": s.serving.replica_num_cpus}] + [
                    {"GPU": 1}
                ] * es.tensor_parallel_size
                opts["placement_group_strategy"] = "STRICT_PACK"
            uc = initial_user_config(a)
            if uc is not None:
                opts["user_config"] = uc
        else:
            opts["num_replicas"] = 1
            opts["ray_actor_options"] = {"num_cpus": IDLE_NUM_CPUS}
        dep = serve.deployment(LLMServer).options(**opts)  # type: ignore[attr-defined]
        handles[slot] = dep.bind(settings_dict, slot, a.engine_cls)
    router = serve.deployment(RouterIngress).options(  # type: ignore[attr-defined]
        name=ROUTER_DEPLOYMENT,
        num_replicas=1,
        max_ongoing_requests=s.serving.max_ongoing_requests * s.serving.replicas * 2,
        max_queued_requests=s.serving.max_queued_requests,
        ray_actor_options={"num_cpus": 0.1},
        user_config=RouteTable().model_dump(mode="json"),
    )
    return router.bind(handles, settings_dict, a.name, a.api_key_hashes)
