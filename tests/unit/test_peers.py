"""Several models behind one endpoint: which app serves which model, and where a new model's app goes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rayloop.errors import ServingError
from rayloop.serving.app import IMPORT_PATH
from rayloop.serving.control import InMemoryControl
from rayloop.serving.peers import Peers, app_for_model, endpoint_models, place_route

pytestmark = pytest.mark.unit


def _app(name: str, model: str | None, route: str = "/") -> dict[str, Any]:
    if model is None:
        return {"name": name, "route_prefix": route, "import_path": "other.module:app", "args": {}}
    return {"name": name, "route_prefix": route, "import_path": IMPORT_PATH, "args": {"model": model}}


def test_endpoint_models_maps_rayloop_apps_on_the_endpoint_only() -> None:
    apps = [
        _app("rayloop", "demo"),
        _app("other", "other", "/models/other"),
        _app("rayloop-staging", "demo", "/staging"),  # a staging app is not behind the endpoint
        _app("dash", None, "/dash"),
        {
            **_app("rayloop-qa", "third", "/qa"),
            "args": {"model": "third", "settings": {"serving": {"staging_route_prefix": "/qa"}}},
        },
    ]
    assert endpoint_models(apps) == {"demo": "rayloop", "other": "other"}


def test_a_second_models_app_moves_to_its_own_route_and_a_taken_route_is_refused() -> None:
    first = _app("rayloop", "demo")
    assert place_route(_app("other", "other"), [first])["route_prefix"] == "/models/other"
    assert place_route(_app("other", "other"), [])["route_prefix"] == "/"
    with pytest.raises(ServingError, match="model 'demo' is already served behind the endpoint by app 'rayloop'"):
        place_route(_app("demo-2", "demo"), [first])
    with pytest.raises(ServingError, match="route '/' is already served by app 'rayloop'") as e:
        place_route(_app("web", None), [first])
    assert "serving.route_prefix" in (e.value.hint or "")
    with pytest.raises(ServingError, match="route '/staging' is already served"):
        place_route(_app("b-staging", "b", "/staging"), [_app("a-staging", "a", "/staging")])
    # The same model on a route of its own is a separate endpoint, not a twin.
    assert place_route(_app("flush", "demo", "/flush"), [_app("fake", "demo", "/fake")])["route_prefix"] == "/flush"


def test_app_for_model_prefers_the_serving_app_then_the_free_default_then_the_models_name() -> None:
    apps = [_app("rayloop", "demo"), _app("other", "other", "/models/other")]
    assert app_for_model(apps, "other", "rayloop") == "other"
    assert app_for_model(apps, "demo", "rayloop") == "rayloop"
    assert app_for_model(apps, "third", "rayloop") == "third"
    assert app_for_model([], "third", "rayloop") == "rayloop"
    assert app_for_model([_app("rayloop", None)], "third", "rayloop") == "rayloop"  # foreign: refused by the caller
    # A configured app on a route of its own is a new endpoint, even when the model is served elsewhere.
    assert app_for_model([_app("rayloop", "demo")], "demo", "rl-tp2", "/tp2") == "rl-tp2"
    assert app_for_model([_app("rayloop", "demo")], "demo", "new", "/") == "rayloop"  # not a twin on /
    # The configured app serving the model wins over another endpoint app serving it.
    assert app_for_model([_app("mine", "demo", "/mine"), _app("rayloop", "demo")], "demo", "mine") == "mine"


def test_in_memory_control_places_a_new_app_like_serve_control() -> None:
    control = InMemoryControl([_app("rayloop", "demo")])
    applied = control.update("other", lambda mine: _app("other", "other"))
    assert applied["route_prefix"] == "/models/other"
    # An app that exists keeps the route it has.
    again = control.update("other", lambda mine: {**(mine or {}), "route_prefix": "/models/other"})
    assert again["route_prefix"] == "/models/other"


def test_peers_cache_and_read_again_on_a_miss() -> None:
    calls: list[int] = []
    now = [0.0]
    apps = [_app("rayloop", "demo")]

    async def fetch() -> list[dict[str, Any]]:
        calls.append(1)
        return list(apps)

    async def run() -> None:
        peers = Peers(ttl_s=5, min_refresh_s=1, fetch=fetch, clock=lambda: now[0])
        assert await peers.app_for("demo") == "rayloop" and len(calls) == 1
        assert await peers.app_for("demo") == "rayloop" and len(calls) == 1  # cached
        apps.append(_app("other", "other", "/models/other"))
        assert await peers.app_for("other") is None and len(calls) == 1  # re-read at most once a second
        now[0] = 1.5
        assert await peers.app_for("other") == "other" and len(calls) == 2  # a miss reads again
        now[0] = 7.0
        assert await peers.models() == {"demo": "rayloop", "other": "other"} and len(calls) == 3  # ttl
        # A listing asks fresh: an app removed a second ago is no longer listed (the ttl would keep it).
        apps.pop()
        now[0] = 8.5
        assert await peers.models() == {"demo": "rayloop", "other": "other"} and len(calls) == 3
        assert await peers.models(fresh=True) == {"demo": "rayloop"} and len(calls) == 4

    asyncio.run(run())
