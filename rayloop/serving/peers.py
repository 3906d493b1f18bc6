"""Several models behind one OpenAI endpoint.

Each model is served by its own Serve app (its own replicas, slots and rollouts). The first one takes
the configured route (``/`` by default); another model's app, when that route is taken, gets
``/models/NAME`` instead (reachable there directly too). Every app's ingress answers for its own model
and forwards a request whose ``model`` names another one to that model's app through a deployment
handle (no second HTTP hop): the other app runs the request exactly as if it had come to it (its auth,
its route table and canary, its capture). ``/v1/models`` lists every model behind the endpoint.

Which app serves which model is read from Serve's deployed configs (rayloop apps, by their ``args``),
cached for a few seconds and read again on a miss. An app on a route of its own (a staging app, or one
given another ``serving.route_prefix``) is not part of the endpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rayloop.errors import ServingError

MODELS_ROUTE = "/models"
ROOT_ROUTE = "/"


def models_route(model: str) -> str:
    """The route of ``model``'s app when the main one is taken: ``/models/NAME``."""
    return f"{MODELS_ROUTE}/{model}"


def app_model(app: dict[str, Any]) -> str | None:
    """The model a deployed rayloop app serves (None for other apps)."""
    from rayloop.serving.app import IMPORT_PATH

    if app.get("import_path") != IMPORT_PATH:
        return None
    model = (app.get("args") or {}).get("model")
    return str(model).partition("@")[0] if model else None


def on_endpoint(app: dict[str, Any]) -> bool:
    """Is ``app`` one of the models behind the endpoint: on ``/`` or ``/models/NAME``? An app on a route
    of its own (a staging app, one a user gave another ``serving.route_prefix``) is an endpoint of its own."""
    prefix = str(app.get("route_prefix") or ROOT_ROUTE)
    return prefix == ROOT_ROUTE or prefix.startswith(MODELS_ROUTE + "/")


def endpoint_models(apps: list[dict[str, Any]]) -> dict[str, str]:
    """Model name -> app name, for the rayloop apps behind the endpoint (``/`` and ``/models/NAME``)."""
    out: dict[str, str] = {}
    for app in sorted(apps, key=lambda a: str(a.get("route_prefix") or ROOT_ROUTE)):
        model = app_model(app)
        if model is not None and on_endpoint(app):
            out.setdefault(model, app["name"])
    return out


def place_route(app: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """``app`` (about to be deployed for the first time) with a route no other app holds.

    A rayloop app whose route is taken moves to ``/models/NAME``; two apps serving one model on the
    endpoint, or a route that is still taken, are refused with what to do.
    """
    taken = {str(o.get("route_prefix") or ROOT_ROUTE): o["name"] for o in others if o.get("route_prefix")}
    prefix = str(app.get("route_prefix") or ROOT_ROUTE)
    model = app_model(app)
    if model is not None and on_endpoint(app):
        twin = endpoint_models(others).get(model)
        if twin is not None:
            raise ServingError(
                f"model {model!r} is already served behind the endpoint by app {twin!r}",
                hint=f"Upgrade it in place (`rayloop serve --model {model}@REF --app {twin}`) or move it with "
                f"`rayloop deploy {model}@REF`; one model, one app.",
            )
    if prefix not in taken:
        return app
    if model is not None and on_endpoint(app):
        moved = models_route(model)
        if moved not in taken:
            return {**app, "route_prefix": moved}
    raise ServingError(
        f"route {prefix!r} is already served by app {taken[prefix]!r}",
        hint="Set serving.route_prefix to a free route, or remove that app first (`rayloop undeploy`).",
    )


def _serve_apps() -> list[dict[str, Any]]:
    from ray.serve.context import _get_global_client

    from rayloop.serving.control import deployed_apps

    client = _get_global_client(raise_if_no_controller_running=False)
    return [] if client is None else deployed_apps(client.get_serve_details())


class Peers:
    """A replica's view of the models behind its endpoint: model -> app, cached ``ttl_s``."""

    def __init__(
        self,
        *,
        ttl_s: float = 5.0,
        min_refresh_s: float = 1.0,
        fetch: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.min_refresh_s, self._clock = ttl_s, min_refresh_s, clock
        self._fetch = fetch or (lambda: asyncio.to_thread(_serve_apps))
        self._models: dict[str, str] = {}
        self._at = float("-inf")
        self._lock = asyncio.Lock()

    async def _refresh(self, *, force: bool) -> dict[str, str]:
        async with self._lock:
            age = self._clock() - self._at
            if age < self.min_refresh_s or (not force and age < self.ttl_s):
                return self._models
            self._models = endpoint_models(await self._fetch())
            self._at = self._clock()
            return self._models

    async def models(self, *, fresh: bool = False) -> dict[str, str]:
        """Model name -> app name of every model behind the endpoint (``fresh``: read again unless it was
        read within ``min_refresh_s``; for listings, which must not show an app just removed)."""
        return dict(await self._refresh(force=fresh))

    async def app_for(self, model: str) -> str | None:
        """The app serving ``model`` (read again once when it is not known yet: it may have just started)."""
        found = (await self._refresh(force=False)).get(model)
        if found is None:
            found = (await self._refresh(force=True)).get(model)
        return found


def app_for_model(apps: list[dict[str, Any]], model: str, default_app: str, default_route: str = ROOT_ROUTE) -> str:
    """Which app serves (or, on its first deploy, will serve) ``model``: ``default_app`` when it serves the
    model (or is not a rayloop app: the caller refuses to touch it), or when it does not exist yet and its
    route is one of its own (a separate endpoint); else the endpoint app that serves the model; else
    ``default_app`` while it is free; else an app named after the model."""
    default = next((a for a in apps if a["name"] == default_app), None)
    if default is not None and app_model(default) in (model, None):
        return default_app
    if default is None and not on_endpoint({"route_prefix": default_route}):
        return default_app
    serving = endpoint_models(apps).get(model)
    if serving is not None:
        return serving
    return default_app if default is None else model
