"""The serving app: one layout for `rayloop serve` and every rollout strategy.

``serve_apps/llm.py:build_app`` hands off to :func:`build_app`, so Serve YAML
``args:``, ``rayloop serve``, the rollout controller and Python callers all go
through :class:`ServeArgs`. The app has three deployments, one per version slot:

- ``llm-stable``: :class:`~rayloop.serving.engine_ingress.EngineIngress`, engine
  replicas that answer HTTP themselves and route. Its ``user_config`` is the
  version it serves (:class:`~rayloop.serving.protocol.ModelConfig`) plus the
  route table under ``routes`` (:class:`~rayloop.serving.routing.RouteTable`).
  With nothing routed elsewhere (the lean layout) a request crosses the Serve
  proxy and one replica, nothing more.
- ``llm-canary`` (also blue-green's *green*) and ``llm-shadow``:
  :class:`~rayloop.serving.server.LLMServer` slots the stable replicas call
  through handles. An *active* slot has the engine's resources and a
  ``user_config`` naming its version; an *idle* one has one replica with a
  token CPU share and no ``user_config``, so it loads no engine. With
  ``rollout.keep_warm_slots`` a released slot is *parked* instead: it keeps its
  engine and version (``parked: true``) and is routed nothing.

Serve moves replicas in place only when ``import_path``, ``args`` and
``runtime_env`` are unchanged, so every change after the first deploy is a
change of ``user_config`` (versions and routes) or of a slot's resources (idle
<-> active), never of ``args``: :func:`app_config` builds the whole entry from
an :class:`AppState` and :func:`read_state` reads one back.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayloop.config import Settings, load_settings
from rayloop.serving.protocol import ModelConfig, parse_ref
from rayloop.serving.routing import CANARY, SHADOW, SLOTS, STABLE, RouteTable

IMPORT_PATH = "serve_apps.llm:build_app"
IDLE_NUM_CPUS = 0.01
SLOT_ROLLING_UPDATE = 1.0  # canary and shadow slots: every replica changes at once (see build_app)
ROUTES_KEY = "routes"


def slot_deployment_name(slot: str) -> str:
    return f"llm-{slot}"


class ServeArgs(BaseModel):
    """Arguments of the rayloop Serve application (``args:`` in a Serve config)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="Model name (NAME), or NAME@REF to resolve a version through the registry at build time."
    )
    path: str | None = Field(default=None, description="Serve this local model directory (no registry).")
    version: int | None = Field(default=None, ge=1, description="Version number to report for `path` (default 1).")
    settings: Settings = Field(
        default_factory=load_settings, description="rayloop settings (default: resolved from env/rayloop.yaml)."
    )
    api_key_hashes: list[str] = Field(default_factory=list, description="sha256 hashes of accepted bearer keys.")
    engine_cls: str | None = Field(
        default=None,
        description="Engine class as 'module:Class' (default vLLM; tests use rayloop.serving.fake_engine:FakeEngine).",
    )

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        parse_ref(v)
        return v

    @model_validator(mode="after")
    def _no_password_in_args(self) -> ServeArgs:
        # Serve shows an app's args in the dashboard and its logs: a registry password moves to storage
        # (the replicas read it from there, beside the models they load).
        from rayloop.registry.registry import without_password

        self.settings = without_password(self.settings)
        return self

    @property
    def name(self) -> str:
        return parse_ref(self.model)[0]


class AppState(BaseModel):
    """The serving app as its controllers see it: slot -> version (None: idle), and the route table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Model name the app serves.")
    slots: dict[str, ModelConfig | None] = Field(description="slot -> the version it serves; None when idle.")
    table: RouteTable = Field(default_factory=RouteTable, description="The ingress's route table.")
    warm: dict[str, int] = Field(
        default_factory=dict,
        description="Idle slots whose engine is kept loaded (rollout.keep_warm_slots): slot -> the version it holds.",
    )

    def version(self, slot: str) -> int | None:
        cfg = self.slots.get(slot)
        return None if cfg is None else cfg.version

    @property
    def lean(self) -> bool:
        """Only stable serves and nothing is routed or mirrored elsewhere."""
        t = self.table
        return (
            t.canary_percent == 0 and t.shadow_percent == 0 and all(self.slots.get(s) is None for s in (CANARY, SHADOW))
        )

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "slots": {s: self.version(s) for s in SLOTS},
            "warm": dict(self.warm),
            "canary_percent": self.table.canary_percent,
            "shadow_percent": self.table.shadow_percent,
            "rollout_id": self.table.rollout_id,
            "epoch": self.table.epoch,
        }


def idle_state(model: str, stable: ModelConfig | None, table: RouteTable | None = None) -> AppState:
    """Only ``stable`` serves; nothing routed elsewhere."""
    slots: dict[str, ModelConfig | None] = dict.fromkeys(SLOTS)
    slots[STABLE] = stable
    return AppState(model=model, slots=slots, table=table or RouteTable())


def check_app_auth(args: ServeArgs) -> None:
    """Fail the app's build (DEPLOY_FAILED, with the reason) rather than serve an open API beyond loopback."""
    from rayloop.serving.auth import check_auth_policy, load_key_hashes

    check_auth_policy(args.settings.serving, set(args.api_key_hashes) | load_key_hashes(args.settings.serving))


def initial_user_config(args: ServeArgs) -> dict[str, Any] | None:
    """The version to load when the config does not say (``path`` or ``@REF`` in args)."""
    from rayloop.serving import checkpoint

    name, ref = parse_ref(args.model)
    if args.path is not None:
        fp = checkpoint.fingerprint(args.path)
        return ModelConfig(model=name, version=args.version or 1, fingerprint=fp, path=args.path).user_config()
    if ref is not None:
        from rayloop.serving.deploy import resolve_version

        return resolve_version(args.settings, args.model).user_config()
    return None


def engine_actor_options(settings: Settings) -> dict[str, Any]:
    """Resources and env of an engine replica (``VLLM_*`` reach replicas only through runtime_env)."""
    es = settings.serving.engine
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(es.kv_cache_gib)))} if es.accelerator == "cpu" else {}
    if es.accelerator == "cpu" and es.cpu_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = es.cpu_threads_bind
    opts: dict[str, Any] = {"num_cpus": settings.serving.replica_num_cpus}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def _placement(settings: Settings) -> dict[str, Any]:
    """GPU engines: one bundle for the replica, one accelerator (GPU) per tensor-parallel shard, all on one node."""
    es = settings.serving.engine
    if es.accelerator != "gpu":
        return {}
    bundles = [{"CPU": settings.serving.replica_num_cpus}] + [{es.accelerator_resource: 1}] * es.tensor_parallel_size
    return {"placement_group_bundles": bundles, "placement_group_strategy": "STRICT_PACK"}


def stable_user_config(cfg: ModelConfig | None, table: RouteTable) -> dict[str, Any]:
    """The stable deployment's ``user_config``: its version (when known) and the route table."""
    out: dict[str, Any] = {} if cfg is None else cfg.user_config()
    out[ROUTES_KEY] = table.model_dump(mode="json")
    return out


def slot_options(settings: Settings, slot: str, cfg: ModelConfig | None) -> dict[str, Any]:
    """The Serve config entry of a canary or shadow slot: active (``cfg``) or idle (None)."""
    if cfg is None:
        return {"name": slot_deployment_name(slot), "num_replicas": 1, "ray_actor_options": {"num_cpus": IDLE_NUM_CPUS}}
    return {
        "name": slot_deployment_name(slot),
        **settings.serving.replica_count(),
        "ray_actor_options": engine_actor_options(settings),
        "user_config": cfg.user_config(),
        **_placement(settings),
    }


def app_config(
    settings: Settings,
    args: ServeArgs,
    state: AppState,
    *,
    app_name: str | None = None,
    parked: dict[str, ModelConfig] | None = None,
) -> dict[str, Any]:
    """The whole ``ServeApplicationSchema`` entry for ``state``.

    ``settings`` give the resources of the slots (for a running app: the settings it was built with);
    ``parked`` gives idle slots whose engine is kept loaded, with the version it holds.
    """
    parked = parked or {}
    deployments: list[dict[str, Any]] = [
        {
            "name": slot_deployment_name(STABLE),
            **settings.serving.replica_count(),
            "ray_actor_options": engine_actor_options(settings),
            "user_config": stable_user_config(state.slots.get(STABLE), state.table),
            **_placement(settings),
        }
    ]
    for slot in (CANARY, SHADOW):
        cfg = state.slots.get(slot)
        if cfg is None and slot in parked:
            cfg = parked[slot].model_copy(update={"parked": True})
        deployments.append(slot_options(settings, slot, cfg))
    return {
        "name": app_name or settings.serving.app_name,
        "route_prefix": settings.serving.route_prefix,
        "import_path": IMPORT_PATH,
        "args": args.model_dump(mode="json", exclude_none=True),
        "deployments": deployments,
    }


def _user_config(app: dict[str, Any], deployment: str) -> dict[str, Any] | None:
    for dep in app.get("deployments", []):
        if dep.get("name") == deployment:
            uc: dict[str, Any] | None = dep.get("user_config")
            return uc
    return None


def read_state(app: dict[str, Any]) -> AppState:
    """The :class:`AppState` of a deployed app's config (what :func:`app_config` wrote, or a YAML deploy)."""
    stable_uc = dict(_user_config(app, slot_deployment_name(STABLE)) or {})
    routes = stable_uc.pop(ROUTES_KEY, None)
    slots: dict[str, ModelConfig | None] = {STABLE: ModelConfig.model_validate(stable_uc) if stable_uc else None}
    warm: dict[str, int] = {}
    for slot in (CANARY, SHADOW):
        uc = _user_config(app, slot_deployment_name(slot))
        cfg = ModelConfig.model_validate(uc) if uc else None
        if cfg is not None and cfg.parked:
            warm[slot], cfg = cfg.version, None
        slots[slot] = cfg
    table = RouteTable.model_validate(routes or {})
    model = str((app.get("args") or {}).get("model", "")).partition("@")[0]
    return AppState(model=model, slots=slots, table=table, warm=warm)


def parked_slots(app: dict[str, Any]) -> dict[str, ModelConfig]:
    """Idle slots of a deployed app whose engines hold a version (active ones count too: they may be released)."""
    out: dict[str, ModelConfig] = {}
    for slot in (CANARY, SHADOW):
        uc = _user_config(app, slot_deployment_name(slot))
        if uc:
            out[slot] = ModelConfig.model_validate(uc).model_copy(update={"parked": False})
    return out


def build_app(args: ServeArgs | dict[str, Any]) -> Any:
    """The Serve application for ``args`` (validated into :class:`ServeArgs`)."""
    from ray import serve

    from rayloop.serving.engine_ingress import EngineIngress
    from rayloop.serving.server import LLMServer

    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    s = a.settings
    check_app_auth(a)
    settings_dict = s.dump()
    common: dict[str, Any] = {
        # Engine start and golden prompts take tens of seconds on CPU.
        "health_check_timeout_s": 120,
        "graceful_shutdown_timeout_s": 30,
    }
    handles: dict[str, Any] = {}
    for slot in (CANARY, SHADOW):
        # A canary or shadow slot serves nobody while its replicas change (traffic moves to it only once it is
        # ready, and off it before it is released): all of them start, or stop, at once. Serve's default
        # rolling update takes 20% of them at a time, so a 2-replica canary started one engine after the other.
        slot_deployment = serve.deployment(LLMServer, rolling_update_percentage=SLOT_ROLLING_UPDATE)
        dep = slot_deployment.options(  # type: ignore[attr-defined]
            name=slot_deployment_name(slot),
            num_replicas=1,
            ray_actor_options={"num_cpus": IDLE_NUM_CPUS},
            max_ongoing_requests=s.serving.max_ongoing_requests,
            max_queued_requests=s.serving.max_queued_requests,
            **common,
        )
        handles[slot] = dep.bind(settings_dict, slot, a.engine_cls)
    # The stable replicas admit max_ongoing + max_queued requests themselves and answer an OpenAI-style 503
    # with Retry-After beyond that. Serve's own limits must never be reached first: its proxy answers a
    # plain-text 503, and with a bounded queue it drops requests of a burst that are only waiting for a
    # replica to be picked. So: headroom above the admission limit (health, feedback and listing calls count
    # too) and no proxy queue limit; a replica refuses what it cannot take at once.
    admitted = s.serving.max_ongoing_requests + s.serving.max_queued_requests
    opts: dict[str, Any] = {
        "name": slot_deployment_name(STABLE),
        **s.serving.replica_count(),
        "max_ongoing_requests": admitted + 32,
        "max_queued_requests": -1,
        "ray_actor_options": engine_actor_options(s),
        **_placement(s),
        **common,
    }
    uc = initial_user_config(a)
    opts["user_config"] = stable_user_config(None if uc is None else ModelConfig.model_validate(uc), RouteTable())
    stable = serve.deployment(EngineIngress).options(**opts)  # type: ignore[attr-defined]
    return stable.bind(settings_dict, a.name, a.api_key_hashes, a.engine_cls, handles)
