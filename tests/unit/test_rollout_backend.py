"""ServeBackend's Serve configs, with Serve's REST calls replaced by an in-memory app (no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rayloop.config import Settings
from rayloop.rollout.app import IDLE_NUM_CPUS, ROUTER_IMPORT_PATH, router_options, slot_deployment, slot_options
from rayloop.rollout.backend import AppState, ServeBackend
from rayloop.rollout.routing import CANARY, SHADOW, SLOTS, STABLE, RouteTable
from rayloop.serving.protocol import ModelConfig


def _cfg(version: int) -> ModelConfig:
    return ModelConfig(model="demo", version=version)


class _Serve:
    """The deployed app as Serve's REST API returns it; ``apply_apps`` replaces it."""

    def __init__(self, settings: Settings, slots: dict[str, ModelConfig | None]) -> None:
        self._apps = [
            {
                "name": settings.serving.app_name,
                "import_path": ROUTER_IMPORT_PATH,
                "args": {"model": "demo", "settings": settings.dump()},
                "deployments": [slot_options(settings, s, slots.get(s)) for s in SLOTS]
                + [router_options(RouteTable())],
            }
        ]

    def apps(self) -> list[dict[str, Any]]:
        return self._apps

    def apply(self, apps: list[dict[str, Any]]) -> None:
        self._apps = apps

    def slot(self, slot: str) -> dict[str, Any]:
        return next(d for d in self._apps[0]["deployments"] if d["name"] == slot_deployment(slot))


@pytest.fixture
def serve_app(tmp_path: Path) -> Any:
    def make(keep_warm: bool, slots: dict[str, ModelConfig | None]) -> tuple[ServeBackend, _Serve]:
        settings = Settings.model_validate({"home": str(tmp_path), "rollout": {"keep_warm_slots": keep_warm}})
        fake = _Serve(settings, slots)
        return ServeBackend(settings, control=fake), fake

    return make


def test_a_released_slot_goes_idle_by_default(serve_app: Any) -> None:
    backend, serve = serve_app(False, {STABLE: _cfg(1), CANARY: _cfg(2)})
    state = backend.read()
    assert state is not None and state.version(CANARY) == 2 and state.warm == {}
    backend.apply(AppState(model="demo", slots={**state.slots, CANARY: None}, table=state.table))
    canary = serve.slot(CANARY)
    assert "user_config" not in canary and canary["ray_actor_options"] == {"num_cpus": IDLE_NUM_CPUS}
    after = backend.read()
    assert after is not None and after.slots[CANARY] is None and after.warm == {}


def test_keep_warm_parks_a_released_slot_and_reuses_it(serve_app: Any) -> None:
    backend, serve = serve_app(True, {STABLE: _cfg(1), CANARY: _cfg(2)})
    active_options = serve.slot(CANARY)["ray_actor_options"]
    state = backend.read()
    assert state is not None

    # Released: same resources (Serve keeps the replica and its engine), the held version parked.
    backend.apply(AppState(model="demo", slots={**state.slots, CANARY: None}, table=state.table))
    canary = serve.slot(CANARY)
    assert canary["ray_actor_options"] == active_options
    assert canary["user_config"] == {"model": "demo", "version": 2, "parked": True}
    parked = backend.read()
    assert parked is not None and parked.slots[CANARY] is None and parked.warm == {CANARY: 2}
    assert parked.summary()["slots"][CANARY] is None and parked.summary()["warm"] == {CANARY: 2}
    # A never-used slot stays idle: there is no engine to keep.
    assert "user_config" not in serve.slot(SHADOW)

    # Still idle in the next change: it stays parked, not dropped.
    backend.apply(AppState(model="demo", slots=parked.slots, table=parked.table.model_copy(update={"epoch": 5})))
    assert serve.slot(CANARY)["user_config"]["parked"] is True

    # The next rollout's version: only user_config changes, so Serve reconfigures the warm replica in place.
    backend.apply(AppState(model="demo", slots={**parked.slots, CANARY: _cfg(3)}, table=parked.table))
    canary = serve.slot(CANARY)
    assert canary["ray_actor_options"] == active_options
    assert canary["user_config"] == {"model": "demo", "version": 3}
    again = backend.read()
    assert again is not None and again.version(CANARY) == 3 and again.warm == {}


def test_turning_keep_warm_off_releases_parked_slots(serve_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, serve = serve_app(True, {STABLE: _cfg(1), CANARY: _cfg(2)})
    state = backend.read()
    assert state is not None
    backend.apply(AppState(model="demo", slots={**state.slots, CANARY: None}, table=state.table))
    assert serve.slot(CANARY)["user_config"]["parked"] is True
    off = backend.settings.rollout.model_copy(update={"keep_warm_slots": False})
    monkeypatch.setattr(backend, "settings", backend.settings.model_copy(update={"rollout": off}))
    parked = backend.read()
    assert parked is not None
    backend.apply(AppState(model="demo", slots=parked.slots, table=parked.table))
    canary = serve.slot(CANARY)
    assert "user_config" not in canary and canary["ray_actor_options"] == {"num_cpus": IDLE_NUM_CPUS}
