"""How the rollout controller reads and changes the router app on Ray Serve.

:class:`Backend` is the seam: the controller and the strategies only see an
:class:`AppState` (which version each slot serves, and the route table) and a
few operations on it. :class:`ServeBackend` implements it on a live Ray Serve
through the declarative path (``ServeDeploySchema`` applied by the controller
or the dashboard REST API), so version changes of an active slot and every
route-table change are in-place ``user_config`` updates. Unit tests pass a
fake backend to the controller instead.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from rayloop.config import Settings
from rayloop.errors import RolloutError
from rayloop.rollout.analysis import SlotWindow
from rayloop.rollout.routing import SLOTS, STABLE, RouteTable
from rayloop.serving.control import Control
from rayloop.serving.protocol import ModelConfig


class AppState(BaseModel):
    """The router app as the controller sees it: slot -> version (None: idle), and the route table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Model name the app serves.")
    slots: dict[str, ModelConfig | None] = Field(description="slot -> the version it serves; None when idle.")
    table: RouteTable = Field(default_factory=RouteTable, description="The router's route table.")
    warm: dict[str, int] = Field(
        default_factory=dict,
        description="Idle slots whose engine is kept loaded (rollout.keep_warm_slots): slot -> the version it holds.",
    )

    def version(self, slot: str) -> int | None:
        cfg = self.slots.get(slot)
        return None if cfg is None else cfg.version

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


class Backend(Protocol):
    """What the controller needs from the serving side."""

    app_name: str

    def read(self) -> AppState | None:
        """The deployed state, or None if the app does not exist."""

    def apply(self, state: AppState) -> None:
        """Ask for ``state`` (returns at once)."""

    def wait(self, state: AppState, timeout_s: float) -> None:
        """Block until every slot serves its version and every router replica applies the table."""

    def ensure_golden(self, cfg: ModelConfig) -> None:
        """Make sure a fresh engine's golden answers of ``cfg`` exist (in-place swaps verify against them)."""

    def smoke(self, slot: str) -> list[str]:
        """Ask the golden prompts to ``slot`` directly (not through the router); return problems found."""

    def window(self, since: float, until: float | None = None) -> dict[str, SlotWindow]:
        """Live per-slot metrics of requests answered in ``[since, until)``."""

    def shadow_window(self, since: float, until: float | None = None) -> dict[str, Any]:
        """Summary of shadow pairs in ``[since, until)``."""


class ServeBackend:
    """:class:`Backend` on a live Ray Serve (needs a connected Ray driver).

    Args:
        settings: rayloop settings; for a new app also its ``args``.
        app_name: Serve application name (default ``settings.serving.app_name``).
        engine_cls: ``module:Class`` engine for a new app (tests).
        api_key_hashes: extra accepted key hashes for a new app.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        app_name: str | None = None,
        engine_cls: str | None = None,
        api_key_hashes: list[str] | None = None,
        control: Control | None = None,
    ) -> None:
        from rayloop.serving.control import ServeControl

        self.settings = settings
        self.app_name = app_name or settings.serving.app_name
        self.engine_cls = engine_cls
        self.api_key_hashes = sorted(api_key_hashes or [])
        self.control: Control = control or ServeControl(settings)
        self._deployed: dict[str, Any] | None = None
        self._since = 0.0

    # -- reading -------------------------------------------------------------
    def _apps(self) -> list[dict[str, Any]]:
        return self.control.apps()

    def read(self) -> AppState | None:
        from rayloop.rollout.app import ROUTER_DEPLOYMENT, ROUTER_IMPORT_PATH

        mine = next((a for a in self._apps() if a["name"] == self.app_name), None)
        self._deployed = mine
        if mine is None:
            return None
        if mine.get("import_path") != ROUTER_IMPORT_PATH:
            raise RolloutError(
                f"Serve app {self.app_name!r} runs {mine.get('import_path')!r}, not the rayloop router "
                f"({ROUTER_IMPORT_PATH}); rollouts need the router in front of the version slots",
                hint="Upgrade it in place with `rayloop serve` (rolling), or delete it (`serve delete`) and "
                "deploy with `rayloop deploy NAME@REF`.",
            )
        slots: dict[str, ModelConfig | None] = {}
        warm: dict[str, int] = {}
        for slot in SLOTS:
            cfg = self._deployed_slot(slot)
            if cfg is not None and cfg.parked:
                warm[slot], cfg = cfg.version, None
            slots[slot] = cfg
        table = RouteTable.model_validate(self._deployed_user_config(ROUTER_DEPLOYMENT) or {})
        return AppState(model=mine["args"]["model"].partition("@")[0], slots=slots, table=table, warm=warm)

    def _deployed_user_config(self, deployment: str) -> dict[str, Any] | None:
        if self._deployed is None:
            return None
        for dep in self._deployed.get("deployments", []):
            if dep["name"] == deployment:
                uc: dict[str, Any] | None = dep.get("user_config")
                return uc
        return None

    def _deployed_slot(self, slot: str) -> ModelConfig | None:
        """The version the deployed app gives ``slot`` (active or parked); None when idle."""
        from rayloop.rollout.app import slot_deployment

        uc = self._deployed_user_config(slot_deployment(slot))
        return ModelConfig.model_validate(uc) if uc else None

    def app_settings(self) -> Settings:
        """Settings the running app was built with (its replicas use these, not the caller's)."""
        if self._deployed is None:
            return self.settings
        return Settings.model_validate(self._deployed["args"].get("settings") or {})

    # -- changing ------------------------------------------------------------
    def apply(self, state: AppState) -> None:
        from rayloop.rollout.app import ROUTER_IMPORT_PATH, router_options, slot_options
        from rayloop.serving.app import ServeArgs

        apps = self._apps()
        mine = next((a for a in apps if a["name"] == self.app_name), None)
        if mine is None:
            args = ServeArgs(
                model=state.model,
                settings=self.settings,
                api_key_hashes=self.api_key_hashes,
                engine_cls=self.engine_cls,
            )
            app: dict[str, Any] = {
                "name": self.app_name,
                "route_prefix": self.settings.serving.route_prefix,
                "import_path": ROUTER_IMPORT_PATH,
                "args": args.model_dump(mode="json", exclude_none=True),
            }
            app_settings = self.settings
        else:
            # Same args/import_path/runtime_env as deployed: only user_config and slot resources change.
            app = {k: v for k, v in mine.items() if k != "deployments"}
            app_settings = Settings.model_validate(mine["args"].get("settings") or {})
        self._deployed = mine
        app["deployments"] = [slot_options(app_settings, s, self._slot_config(s, state)) for s in SLOTS] + [
            router_options(state.table)
        ]
        others = [a for a in apps if a["name"] != self.app_name]
        self._since = time.time()
        self.control.apply([*others, app])
        self._deployed = app

    def _slot_config(self, slot: str, state: AppState) -> ModelConfig | None:
        """What ``slot`` is given: its version in ``state``; when that is idle and
        ``rollout.keep_warm_slots`` is on, the version its engine holds now, parked."""
        cfg = state.slots.get(slot)
        if cfg is not None or not self.settings.rollout.keep_warm_slots:
            return cfg
        held = self._deployed_slot(slot)
        return None if held is None else held.model_copy(update={"parked": True})

    def _handle(self, deployment: str) -> Any:
        from ray import serve

        return serve.get_deployment_handle(deployment, self.app_name)

    def wait(self, state: AppState, timeout_s: float) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        last = "no status yet"
        while time.monotonic() < deadline:
            st = serve.status().applications.get(self.app_name)
            if st is not None:
                last = f"{st.status}: {st.message}"[:500]
                if st.status == "DEPLOY_FAILED":
                    raise RolloutError(f"Serve app {self.app_name!r} failed to deploy: {st.message}")
                healthy = st.status == "RUNNING" and all(d.status == "HEALTHY" for d in st.deployments.values())
                if healthy and st.last_deployed_time_s >= self._since - 1 and self._converged(state):
                    return
            time.sleep(0.5)
        raise RolloutError(
            f"Serve app {self.app_name!r} did not reach the wanted state within {timeout_s:.0f}s ({last})",
            hint="Check `serve status` and the replica logs; raise rollout.ready_timeout_s for slow engine starts.",
        )

    def _converged(self, state: AppState) -> bool:
        from rayloop.rollout.app import ROUTER_DEPLOYMENT, slot_deployment

        n = max(2, 2 * self.app_settings().serving.replicas)
        try:
            for slot in SLOTS:
                h = self._handle(slot_deployment(slot))
                want = state.version(slot)
                for _ in range(n if want is not None else 2):
                    info = h.info.remote().result(timeout_s=30)
                    # An idle slot has no version, or a parked one (kept warm, routed nothing).
                    got = None if info.get("parked") else info["version"]
                    if got != want:
                        return False
            r = self._handle(ROUTER_DEPLOYMENT)
            for _ in range(2):
                if r.routing.remote().result(timeout_s=30)["table"]["epoch"] != state.table.epoch:
                    return False
        except Exception:
            return False
        return True

    def ensure_golden(self, cfg: ModelConfig) -> None:
        from rayloop.serving.deploy import ensure_golden

        ensure_golden(self.app_settings(), cfg, engine_cls=self._deployed_engine_cls())

    def _deployed_engine_cls(self) -> str | None:
        if self._deployed is None:
            return self.engine_cls
        ec: str | None = self._deployed["args"].get("engine_cls")
        return ec

    def smoke(self, slot: str) -> list[str]:
        from rayloop.rollout.app import slot_deployment
        from rayloop.serving import golden
        from rayloop.serving.protocol import ReplyHead

        problems: list[str] = []
        h = self._handle(slot_deployment(slot))
        info = h.info.remote().result(timeout_s=30)
        if (info.get("last_swap") or {}).get("golden_ok") is False:
            problems.append(f"slot {slot}: a fresh engine disagrees with the version's golden record")
        model = info.get("model") or ""
        for i, prompt in enumerate(golden.PROMPTS):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
                "temperature": 0,
            }
            try:
                gen = h.options(stream=True).chat.remote(body, f"smoke-{slot}-{i}-{time.time_ns()}")
                head = None
                for item in gen:
                    if isinstance(item, ReplyHead):
                        head = item
                if head is None or head.status != 200:
                    problems.append(f"slot {slot}: golden prompt {i} got status {getattr(head, 'status', None)}")
            except Exception as e:
                problems.append(f"slot {slot}: golden prompt {i} failed: {type(e).__name__}: {e}")
        return problems

    # -- metrics -------------------------------------------------------------
    def _stats(self) -> Any:
        from rayloop.rollout.stats import get_stats_actor

        return get_stats_actor(self.app_name, self.app_settings(), create=False)

    def window(self, since: float, until: float | None = None) -> dict[str, SlotWindow]:
        actor = self._stats()
        if actor is None:
            return {}
        raw: dict[str, dict[str, Any]] = _get(actor.window.remote(since, until))
        return {k: SlotWindow.model_validate(v) for k, v in raw.items()}

    def shadow_window(self, since: float, until: float | None = None) -> dict[str, Any]:
        actor = self._stats()
        if actor is None:
            return {"pairs": 0}
        out: dict[str, Any] = _get(actor.shadow_window.remote(since, until))
        return out


def _get(ref: Any) -> Any:
    import ray

    return ray.get(ref, timeout=60)


def idle_state(model: str, stable: ModelConfig | None, table: RouteTable | None = None) -> AppState:
    """Only ``stable`` serves; nothing routed elsewhere."""
    slots: dict[str, ModelConfig | None] = dict.fromkeys(SLOTS)
    slots[STABLE] = stable
    return AppState(model=model, slots=slots, table=table or RouteTable())
