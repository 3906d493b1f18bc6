"""Build the plain Serve application: one ``llm-stable`` deployment of engine replicas.

By default (``serving.ingress_in_engine``) the engine replicas answer HTTP themselves
(:class:`~rayloop.serving.engine_ingress.EngineIngress`); otherwise ``OpenAIIngress``
forwards to an ``LLMServer`` deployment.

``build_openai_app(args)`` is what ``serve_apps/llm.py:build_app`` hands off
to, so ``serve run``/``serve deploy`` YAML ``args:``, ``rayloop serve`` and
Python callers all go through :class:`ServeArgs`.

The model *version* is deliberately not part of the args: it lives in the
``LLMServer`` deployment's ``user_config``, so a new version is a
``user_config`` change that Serve applies in place (see
:mod:`rayloop.serving.deploy`). ``args.model`` may still carry ``@REF`` or a
``path`` for one-off ``serve run``; that becomes the initial ``user_config``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rayloop.config import Settings, load_settings
from rayloop.serving.protocol import ModelConfig, parse_ref

STABLE_SLOT = "stable"
INGRESS_NAME = "OpenAIIngress"


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

    @property
    def name(self) -> str:
        return parse_ref(self.model)[0]


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


def check_app_auth(args: ServeArgs) -> None:
    """Fail the app's build (DEPLOY_FAILED, with the reason) rather than serve an open API beyond loopback."""
    from rayloop.serving.auth import check_auth_policy, load_key_hashes

    check_auth_policy(args.settings.serving, set(args.api_key_hashes) | load_key_hashes(args.settings.serving))


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


def build_openai_app(args: ServeArgs | dict[str, Any]) -> Any:
    """The Serve application for ``args`` (validated into :class:`ServeArgs`)."""
    from ray import serve

    from rayloop.serving.ingress import OpenAIIngress
    from rayloop.serving.server import LLMServer

    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    s = a.settings
    check_app_auth(a)
    es = s.serving.engine
    opts: dict[str, Any] = {
        "name": slot_deployment_name(STABLE_SLOT),
        "num_replicas": s.serving.replicas,
        "max_ongoing_requests": s.serving.max_ongoing_requests,
        "max_queued_requests": s.serving.max_queued_requests,
        "ray_actor_options": engine_actor_options(s),
        # Engine start and golden prompts take tens of seconds on CPU.
        "health_check_timeout_s": 120,
        "graceful_shutdown_timeout_s": 30,
    }
    if es.accelerator == "gpu":
        # One bundle for the replica, one GPU per tensor-parallel shard.
        opts["placement_group_bundles"] = [{"CPU": s.serving.replica_num_cpus}] + [{"GPU": 1}] * es.tensor_parallel_size
        opts["placement_group_strategy"] = "STRICT_PACK"
    uc = initial_user_config(a)
    if uc is not None:
        opts["user_config"] = uc
    settings_dict = s.dump()
    if s.serving.ingress_in_engine:
        from rayloop.serving.engine_ingress import EngineIngress

        # The replica admits max_ongoing + max_queued requests itself and answers an OpenAI-style 503 with
        # Retry-After beyond that. Serve's own limits must never be reached first: its proxy answers a
        # plain-text 503, and with a bounded queue it drops requests of a burst that are only waiting for
        # a replica to be picked. So: headroom above the admission limit (health, feedback and listing
        # calls count too) and no proxy queue limit; a replica refuses what it cannot take at once.
        admitted = s.serving.max_ongoing_requests + s.serving.max_queued_requests
        opts["max_ongoing_requests"] = admitted + 32
        opts["max_queued_requests"] = -1
        direct = serve.deployment(EngineIngress).options(**opts)  # type: ignore[attr-defined]
        return direct.bind(settings_dict, a.name, a.api_key_hashes, a.engine_cls)
    server = serve.deployment(LLMServer).options(**opts).bind(settings_dict, STABLE_SLOT, a.engine_cls)  # type: ignore[attr-defined]
    ingress = serve.deployment(OpenAIIngress).options(  # type: ignore[attr-defined]
        name=INGRESS_NAME,
        num_replicas=1,
        # The ingress only forwards: the engine deployment enforces the queue limit and answers an
        # OpenAI-style 503 with Retry-After, which a limit here would pre-empt with Serve's own 503.
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0.1},
    )
    return ingress.bind({STABLE_SLOT: server}, settings_dict, a.name, a.api_key_hashes)
