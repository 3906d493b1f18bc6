"""ServeBackend's Serve configs, with the Serve seam replaced by an in-memory app (no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rayloop.config import Settings
from rayloop.rollout.backend import ServeBackend
from rayloop.serving.app import IDLE_NUM_CPUS, AppState, ServeArgs, app_config, slot_deployment_name
from rayloop.serving.control import InMemoryControl
from rayloop.serving.protocol import ModelConfig
from rayloop.serving.routing import CANARY, SHADOW, STABLE, RouteTable


def _cfg(version: int) -> ModelConfig:
    return ModelConfig(model="demo", version=version)


class _Serve(InMemoryControl):
    """The deployed apps, in memory; ``slot`` reads one deployment of the rayloop app."""

    def __init__(self, settings: Settings | None = None, slots: dict[str, ModelConfig | None] | None = None) -> None:
        super().__init__()
        if settings is not None:
            args = ServeArgs(model="demo", settings=settings)
            self.deployed = [app_config(settings, args, AppState(model="demo", slots=slots or {}, table=RouteTable()))]

    def slot(self, slot: str) -> dict[str, Any]:
        return next(d for d in self.deployed[0]["deployments"] if d["name"] == slot_deployment_name(slot))


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


def test_rayloop_serve_and_rollouts_move_one_layout(tmp_path: Path) -> None:
    """What `rayloop serve` starts, the rollout backend moves (and back): same import path and args throughout."""
    from rayloop.errors import ServingError
    from rayloop.serving.app import IMPORT_PATH
    from rayloop.serving.deploy import deploy

    settings = Settings.model_validate({"home": str(tmp_path)})
    serve = _Serve()
    deploy(settings, _cfg(1), control=serve, wait=False, record_golden=False)
    (app,) = serve.deployed
    assert app["import_path"] == IMPORT_PATH
    assert [d["name"] for d in app["deployments"]] == ["llm-stable", "llm-canary", "llm-shadow"]
    stable_uc = serve.slot(STABLE)["user_config"]
    assert (stable_uc["version"], stable_uc["routes"]["epoch"], stable_uc["routes"]["canary_percent"]) == (1, 1, 0)
    args = app["args"]

    backend = ServeBackend(settings, control=serve)
    state = backend.read()
    assert state is not None and state.lean and state.version(STABLE) == 1
    table = state.table.model_copy(update={"canary_percent": 10, "versions": {STABLE: 1, CANARY: 2}, "epoch": 2})
    backend.apply(AppState(model="demo", slots={**state.slots, CANARY: _cfg(2)}, table=table))
    assert serve.deployed[0]["import_path"] == IMPORT_PATH and serve.deployed[0]["args"] == args
    assert serve.slot(STABLE)["user_config"]["routes"]["canary_percent"] == 10
    assert serve.slot(CANARY)["user_config"] == {"model": "demo", "version": 2}

    # Mid-rollout, `rayloop serve` leaves the app to the controller.
    with pytest.raises(ServingError, match="in the middle of a rollout"):
        deploy(settings, _cfg(3), control=serve, wait=False, record_golden=False)

    back = backend.read()
    assert back is not None
    lean = back.table.model_copy(update={"canary_percent": 0, "versions": {STABLE: 1}, "epoch": 3})
    backend.apply(AppState(model="demo", slots={**back.slots, CANARY: None}, table=lean))
    res = deploy(settings, _cfg(3), control=serve, wait=False, record_golden=False)
    assert (res.version, res.upgraded_from) == (3, 1)
    assert serve.deployed[0]["args"] == args
    stable_uc = serve.slot(STABLE)["user_config"]
    assert (stable_uc["version"], stable_uc["routes"]["epoch"]) == (3, 4)
