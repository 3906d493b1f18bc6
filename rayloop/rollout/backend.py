"""How the rollout controller reads and changes the serving app on Ray Serve.

:class:`Backend` is the seam: the controller and the strategies only see an
:class:`~rayloop.serving.app.AppState` (which version each slot serves, and the
route table) and a few operations on it. :class:`ServeBackend` implements it
on a live Ray Serve through the same app layout (:mod:`rayloop.serving.app`)
and Serve seam (:mod:`rayloop.serving.control`) as `rayloop serve`, so version
changes of an active slot and every route-table change are in-place
``user_config`` updates. Unit tests pass a fake backend to the controller
instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from rayloop.config import Settings
from rayloop.errors import LeaseLostError, RolloutError
from rayloop.serving.app import AppState, idle_state
from rayloop.serving.control import Control
from rayloop.serving.protocol import ModelConfig
from rayloop.serving.stats import SlotWindow

__all__ = ["AppState", "Backend", "ServeBackend", "idle_state"]


class Backend(Protocol):
    """What the controller needs from the serving side."""

    app_name: str

    def select(self, model: str) -> None:
        """Act on the app that serves ``model`` (or that its first deploy creates), unless an app was named."""

    def read(self) -> AppState | None:
        """The deployed state, or None if the app does not exist."""

    def apply(self, state: AppState) -> None:
        """Ask for ``state`` (returns at once)."""

    def wait(
        self,
        state: AppState,
        timeout_s: float,
        *,
        check: Callable[[], None] | None = None,
        progress: Callable[[str], None] | None = None,
        released: frozenset[str] = frozenset(),
        whole: bool = True,
    ) -> None:
        """Block until every slot serves its version and every stable replica applies the table; ``check`` runs
        on every poll and may raise to stop waiting; ``progress`` gets a line each time Serve's status of the
        app changes; slots in ``released`` (routed nothing, on their way out) are not waited for; with
        ``whole=False`` the kept slots' running replicas count, not their number (a rollback's way back)."""

    def ensure_golden(self, cfg: ModelConfig) -> None:
        """Make sure a fresh engine's golden answers of ``cfg`` exist (in-place swaps verify against them)."""

    def smoke(self, slot: str) -> list[str]:
        """Ask the golden prompts to ``slot`` directly (not through the ingress); return problems found."""

    def window(self, since: float, until: float | None = None) -> dict[str, SlotWindow]:
        """Live per-slot metrics of requests answered in ``[since, until)``."""

    def shadow_window(self, since: float, until: float | None = None) -> dict[str, Any]:
        """Summary of shadow pairs in ``[since, until)``."""

    def stats_since(self) -> float:
        """When the stats store began holding observations; a store that was lost starts again, empty."""

    def unplaced(self, slots: frozenset[str]) -> dict[str, str]:
        """Actor name -> state of ``slots``' replicas that have no node yet (none where that cannot be told)."""


class ServeBackend:
    """:class:`Backend` on a live Ray Serve (needs a connected Ray driver).

    Args:
        settings: rayloop settings; for a new app also its ``args``.
        app_name: Serve application name (default ``settings.serving.app_name``).
        engine_cls: ``module:Class`` engine for a new app (tests).
        api_key_hashes: extra accepted key hashes for a new app.
        control: the Serve seam (default: the live cluster's).
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
        self._named = app_name is not None
        self.engine_cls = engine_cls
        self.api_key_hashes = sorted(api_key_hashes or [])
        self.control: Control = control or ServeControl(settings)
        self._deployed: dict[str, Any] | None = None
        self._since = 0.0

    # -- reading -------------------------------------------------------------
    def _mine(self, apps: list[dict[str, Any]]) -> dict[str, Any] | None:
        from rayloop.serving.app import IMPORT_PATH

        mine = next((a for a in apps if a["name"] == self.app_name), None)
        if mine is not None and mine.get("import_path") != IMPORT_PATH:
            raise RolloutError(
                f"Serve app {self.app_name!r} runs {mine.get('import_path')!r}, not the rayloop serving app "
                f"({IMPORT_PATH})",
                hint="Pick another app name (serving.app_name), or delete that app (`serve delete`) and deploy "
                "with `rayloop serve` or `rayloop deploy NAME@REF`.",
            )
        return mine

    def select(self, model: str) -> None:
        from rayloop.serving.peers import app_for_model

        if not self._named:
            sv = self.settings.serving
            self.app_name = app_for_model(self.control.apps(), model, sv.app_name, sv.route_prefix)

    def read(self) -> AppState | None:
        from rayloop.serving.control import running_state

        mine = self._mine(self.control.apps())
        self._deployed = mine
        # (an app whose config names an alias instead of a version, as a KubeRay manifest does: what its
        # replicas serve)
        return None if mine is None else running_state(mine)

    def app_settings(self) -> Settings:
        """Settings the running app was built with (its replicas use these, not the caller's)."""
        if self._deployed is None:
            return self.settings
        return Settings.model_validate(self._deployed["args"].get("settings") or {})

    # -- changing ------------------------------------------------------------
    def apply(self, state: AppState) -> None:
        from rayloop.serving.app import ServeArgs, app_config, parked_slots

        def build(mine: dict[str, Any] | None) -> dict[str, Any]:
            mine = self._mine([mine] if mine is not None else [])
            if mine is None:
                args = ServeArgs(
                    model=state.model,
                    settings=self.settings,
                    api_key_hashes=self.api_key_hashes,
                    engine_cls=self.engine_cls,
                )
            else:
                # Same args/import_path/runtime_env as deployed: only user_config and slot resources change.
                args = ServeArgs.model_validate(mine["args"])
            # With keep_warm_slots (this caller's setting), released slots keep their engine and version, parked.
            keep = parked_slots(mine) if mine is not None and self.settings.rollout.keep_warm_slots else {}
            app = app_config(args.settings, args, state, app_name=self.app_name, parked=keep)
            if mine is not None:
                app["route_prefix"] = mine.get("route_prefix", app["route_prefix"])
                app.update({k: v for k, v in mine.items() if k == "runtime_env"})
            return app

        self._since = time.time()
        self._deployed = self.control.update(self.app_name, build)

    def wait(
        self,
        state: AppState,
        timeout_s: float,
        *,
        check: Callable[[], None] | None = None,
        progress: Callable[[str], None] | None = None,
        released: frozenset[str] = frozenset(),
        whole: bool = True,
    ) -> None:
        from rayloop.serving.control import wait_for_state

        try:
            wait_for_state(
                self.app_name,
                state,
                since=self._since,
                timeout_s=timeout_s,
                replicas=self.app_settings().serving.max_replicas,
                check=check,
                progress=progress,
                released=released,
                whole=whole,
            )
        except LeaseLostError:
            raise
        except Exception as e:
            raise RolloutError(str(getattr(e, "message", e)), hint=getattr(e, "hint", None)) from e
        if gone := frozenset(s for s in released if state.slots.get(s) is None):
            self._cancel_unplaced(gone, progress)

    def _cancel_unplaced(self, released: frozenset[str], progress: Callable[[str], None] | None) -> None:
        """Released slots' replicas that never found room are stopped at once (best effort: Serve stops them
        itself, only later), so that the room their slot's running replicas hold is freed sooner. What it
        stopped, or why it could not, goes to ``progress``."""
        from rayloop.serving.control import ServeControl

        if not isinstance(self.control, ServeControl):
            return
        say = progress or (lambda line: None)
        try:
            cancelled = self.control.cancel_unplaced(self.app_name, released)
        except Exception as e:  # Serve force-stops them after graceful_shutdown_timeout_s anyway
            say(f"could not stop the released slots' replicas that never found a node ({e}); Serve stops them later")
            return
        if cancelled:
            say(
                f"stopped {len(cancelled)} replica(s) of released slots that never found a node: {', '.join(cancelled)}"
            )

    def _handle(self, deployment: str) -> Any:
        from ray import serve

        return serve.get_deployment_handle(deployment, self.app_name)

    def ensure_golden(self, cfg: ModelConfig) -> None:
        from rayloop.serving.deploy import ensure_golden

        # Bounded by this process's rollout.ready_timeout_s (the app's settings carry the one it was served with).
        ensure_golden(
            self.app_settings(),
            cfg,
            engine_cls=self._deployed_engine_cls(),
            timeout_s=self.settings.rollout.ready_timeout_s,
        )

    def _deployed_engine_cls(self) -> str | None:
        if self._deployed is None:
            return self.engine_cls
        ec: str | None = self._deployed["args"].get("engine_cls")
        return ec

    def smoke(self, slot: str) -> list[str]:
        from rayloop.serving import golden
        from rayloop.serving.app import slot_deployment_name
        from rayloop.serving.protocol import ReplyHead

        problems: list[str] = []
        h = self._handle(slot_deployment_name(slot))
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
        from rayloop.serving.stats import get_stats_actor

        return get_stats_actor(self.app_name, self.app_settings(), create=False)

    def unplaced(self, slots: frozenset[str]) -> dict[str, str]:
        from rayloop.serving.control import ServeControl

        if not isinstance(self.control, ServeControl):
            return {}
        return self.control.unplaced(self.app_name, slots)

    def stats_since(self) -> float:
        from rayloop.serving.stats import get_stats_actor

        actor = get_stats_actor(self.app_name, self.app_settings(), create=True)
        return float(_get(actor.started_at.remote()))

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
