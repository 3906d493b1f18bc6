"""The web console: a read-only Serve application on the cluster (``rayloop console`` deploys it).

Pages (server-rendered HTML, charts drawn by the vendored uPlot, no CDN, no external request):

======================================  ==================================================================
``/console/``                           models, what serves them, their rollouts; capture health
``/console/models/NAME``                versions with aliases and gate decisions, the running rollout with
                                        live traffic weights and per-slot latency, errors and feedback,
                                        the last rollouts with their verdicts
``/console/models/NAME/versions/N``     the lineage graph of a version (parents, data snapshots, training
                                        runs, gate reports)
``/console/rollouts/ID``                one rollout: traffic weight over time, step verdicts, timeline
``/console/api/models/NAME/live``       the live view as JSON (the model page polls it)
======================================  ==================================================================

Behind the API keys (``serving.api_keys_env`` / ``api_keys_file``): sign in once with a key at
``/console/login`` and a signed session cookie carries it (see :mod:`rayloop.console.session`); a
``Bearer`` header works too. With no key configured it follows the API's rule: open on a loopback
``serving.http_host`` only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from rayloop.config import Settings
from rayloop.console import session, views
from rayloop.errors import NotFoundError

logger = logging.getLogger("ray.serve")
HERE = Path(__file__).parent
IMPORT_PATH = "serve_apps.console:build_app"
DEPLOYMENT = "console"
STATUS_CACHE_S = 1.0

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


class ConsoleArgs(BaseModel):
    """Arguments of the console's Serve application."""

    model_config = ConfigDict(extra="forbid")

    settings: Settings = Field(description="rayloop settings (the registry, storage and Serve it reads).")
    api_key_hashes: list[str] = Field(default_factory=list, description="sha256 hashes of accepted keys.")


def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pct"] = lambda v: "" if v is None else f"{float(v):.4g}%"
    env.filters["num"] = _num
    return env


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


BOX_W, BOX_H, GAP_X, GAP_Y = 200, 86, 60, 34
COLUMNS = {"snapshot": 0, "training": 1, "version": 2, "gate": 3}


def _layout(data: dict[str, Any]) -> dict[str, Any]:
    """Positions for the lineage graph: one row per version (oldest at the top), one column per kind."""
    rows = {f"v{v.version}": i for i, v in enumerate(reversed(data["chain"]))}
    boxes = {}
    for n in data["nodes"]:
        row = rows.get(f"v{n.id[1:]}", 0)
        x = COLUMNS[n.kind] * (BOX_W + GAP_X) + 10
        y = row * (BOX_H + GAP_Y) + 10
        boxes[n.id] = {"node": n, "x": x, "y": y}
    arrows = []
    for src, dst, label in data["edges"]:
        if src not in boxes or dst not in boxes:
            continue
        a, b = boxes[src], boxes[dst]
        if a["y"] == b["y"]:  # same row: left to right
            x1, y1, x2, y2 = a["x"] + BOX_W, a["y"] + BOX_H / 2, b["x"], b["y"] + BOX_H / 2
        else:  # parent above child
            x1, y1, x2, y2 = a["x"] + BOX_W / 2, a["y"] + BOX_H, b["x"] + BOX_W / 2, b["y"]
        arrows.append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "label": label})
    width = len(COLUMNS) * (BOX_W + GAP_X)
    height = max(1, len(rows)) * (BOX_H + GAP_Y) + 10
    return {"boxes": list(boxes.values()), "arrows": arrows, "width": width, "height": height, "w": BOX_W, "h": BOX_H}


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(app)
class Console:
    def __init__(self, args: dict[str, Any]) -> None:
        from rayloop.registry.registry import Registry
        from rayloop.serving.auth import KeyChecker, check_auth_policy, load_key_hashes
        from rayloop.storage import Storage

        a = ConsoleArgs.model_validate(args)
        self.settings = a.settings
        hashes = load_key_hashes(self.settings.serving) | set(a.api_key_hashes)
        check_auth_policy(self.settings.serving, hashes)
        self.keys = KeyChecker(hashes)
        self.prefix = self.settings.monitoring.console_route_prefix.rstrip("/")
        storage = Storage(self.settings.storage_root, s3_endpoint=self.settings.storage.s3_endpoint)
        self.secret = session.console_secret(storage)
        self.reg = Registry.from_settings(self.settings)
        self.templates = _templates()
        self._status: dict[str | None, tuple[float, dict[str, Any]]] = {}

    # -- auth ------------------------------------------------------------------
    def _signed_in(self, request: Request) -> bool:
        if not self.keys.enabled:
            return True  # no key configured: open, as the API is (loopback only; checked at start)
        if self.keys.allows(request.headers.get("authorization")):
            return True
        return session.verify(self.secret, request.cookies.get(session.COOKIE), self.keys.hashes)

    def _sign_in_first(self, request: Request) -> Response:
        if request.url.path.startswith(f"{self.prefix}/api/"):
            return JSONResponse({"error": "sign in at /login or send an API key as a Bearer token"}, status_code=401)
        target = urllib.parse.quote(request.url.path, safe="/")
        return RedirectResponse(f"{self.prefix}/login?next={target}", status_code=303)

    @app.get("/login")
    async def login_form(self, request: Request, next: str = "", failed: int = 0) -> Response:
        return self._page("login.html", title="Sign in", next=session.safe_next(next, self.prefix), failed=bool(failed))

    @app.post("/login")
    async def login(self, request: Request) -> Response:
        form = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
        key = (form.get("key") or [""])[0].strip()
        target = session.safe_next((form.get("next") or [""])[0], self.prefix)
        if not key or not self.keys.allows(f"Bearer {key}"):
            quoted = urllib.parse.quote(target, safe="/")
            return RedirectResponse(f"{self.prefix}/login?failed=1&next={quoted}", status_code=303)
        from rayloop.serving.auth import hash_key

        ttl = self.settings.monitoring.console_session_hours * 3600
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            session.COOKIE,
            session.issue(self.secret, hash_key(key), ttl),
            max_age=int(ttl),
            path=self.prefix + "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @app.post("/logout")
    async def logout(self, request: Request) -> Response:
        response = RedirectResponse(f"{self.prefix}/login", status_code=303)
        response.delete_cookie(session.COOKIE, path=self.prefix + "/")
        return response

    # -- pages -----------------------------------------------------------------
    @app.get("/")
    async def index(self, request: Request) -> Response:
        if not self._signed_in(request):
            return self._sign_in_first(request)
        doc = await self._status_doc(None)
        data = await asyncio.to_thread(views.overview, self.reg, doc)
        return self._page("index.html", title="Models", **data)

    @app.get("/models/{name}")
    async def model(self, request: Request, name: str) -> Response:
        if not self._signed_in(request):
            return self._sign_in_first(request)
        if name not in await asyncio.to_thread(self.reg.list_models):
            return self._not_found(f"no model named {name!r}")
        doc = await self._status_doc(name)
        data = await asyncio.to_thread(views.model_page, self.reg, name, doc, time.time())
        return self._page("model.html", title=name, **data)

    @app.get("/models/{name}/versions/{version}")
    async def version(self, request: Request, name: str, version: int) -> Response:
        if not self._signed_in(request):
            return self._sign_in_first(request)
        try:
            data = await asyncio.to_thread(views.lineage, self.reg, name, version)
        except NotFoundError as e:
            return self._not_found(str(e))
        return self._page("version.html", title=f"{name}@{version}", graph=_layout(data), **data)

    @app.get("/rollouts/{rid}")
    async def rollout(self, request: Request, rid: int) -> Response:
        if not self._signed_in(request):
            return self._sign_in_first(request)
        try:
            data = await asyncio.to_thread(views.rollout_page, self.reg, rid)
        except NotFoundError as e:
            return self._not_found(str(e))
        return self._page("rollout.html", title=f"Rollout {rid}", **data)

    @app.get("/api/models/{name}/live")
    async def live(self, request: Request, name: str) -> Response:
        if not self._signed_in(request):
            return self._sign_in_first(request)
        doc = await self._status_doc(name)
        return JSONResponse(views.live(doc, name, time.time()))

    @app.get("/healthz")
    async def healthz(self) -> Response:
        return JSONResponse({"status": "ok"})

    # -- helpers ---------------------------------------------------------------
    async def _status_doc(self, name: str | None) -> dict[str, Any]:
        """``rayloop status`` for ``name`` (all models: None), at most STATUS_CACHE_S old."""
        cached = self._status.get(name)
        if cached is not None and time.monotonic() - cached[0] < STATUS_CACHE_S:
            return cached[1]
        from rayloop.rollout.controller import status

        doc = await asyncio.to_thread(status, self.settings, name)
        self._status[name] = (time.monotonic(), doc)
        return doc

    def _page(self, template: str, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(template).render(prefix=self.prefix, signed_in=self.keys.enabled, **context)
        return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"})

    def _not_found(self, message: str) -> HTMLResponse:
        html = self.templates.get_template("error.html").render(
            prefix=self.prefix, signed_in=self.keys.enabled, title="Not found", message=message
        )
        return HTMLResponse(html, status_code=404)


def build_app(args: dict[str, Any]) -> Any:
    a = ConsoleArgs.model_validate(args)
    return Console.options(ray_actor_options={"num_cpus": a.settings.monitoring.console_num_cpus}).bind(  # type: ignore[attr-defined]
        a.model_dump(mode="json")
    )


def app_config(settings: Settings, api_key_hashes: list[str] | None = None) -> dict[str, Any]:
    """The console's entry in Serve's config."""
    from rayloop.registry.registry import without_password

    args = ConsoleArgs(settings=without_password(settings), api_key_hashes=sorted(api_key_hashes or []))
    mon = settings.monitoring
    return {
        "name": mon.console_app_name,
        "route_prefix": mon.console_route_prefix,
        "import_path": IMPORT_PATH,
        "args": args.model_dump(mode="json", exclude_none=True),
    }


def deploy_console(settings: Settings, api_key_hashes: list[str] | None = None, timeout_s: float = 120.0) -> str:
    """Deploy (or update) the console on the cluster; returns its URL once it answers."""
    from rayloop.serving.control import ServeControl, serve_proxy_url

    app_cfg = app_config(settings, api_key_hashes)
    ServeControl(settings).update(settings.monitoring.console_app_name, lambda mine: app_cfg)
    url = serve_proxy_url(settings) + settings.monitoring.console_route_prefix.rstrip("/") + "/"
    _wait_healthy(url + "healthz", timeout_s)
    return url


def _wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    from rayloop.errors import ServingError

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.5)
    raise ServingError(
        f"the console did not answer at {url} within {timeout_s:.0f}s ({last})",
        hint="Check `serve status` and the console replica's log.",
    )
