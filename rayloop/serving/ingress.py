"""``OpenAIIngress``: the HTTP face of a served model (FastAPI on Serve).

It holds a handle per *slot* (``stable``, ``canary``, ``shadow``) and forwards
OpenAI requests to the slot :meth:`pick_slot` chooses;
:class:`~rayloop.serving.engine_ingress.EngineIngress` (the deployment that
runs it) answers ``stable`` itself and adds weighted, sticky and shadow routing
through :meth:`pick_slot` and :meth:`after_response`. Bodies are forwarded as
dicts and validated by vLLM in the engine.

Every response carries ``x-rayloop-request-id`` and, once an engine answered,
``x-rayloop-model-version``; ``model`` in the body is ``NAME@vN``. Requests
may name the model as ``NAME`` or ``NAME@...`` (any suffix: the slot's current
version answers and says which it was). Every answered request becomes an
interaction row; ``POST /v1/feedback`` adds a feedback row (404 for request
ids that were never captured).

A request naming another model served behind the same endpoint goes to that
model's app through a handle (:meth:`OpenAIIngress.forwarded`, see
:mod:`rayloop.serving.peers`); ``/v1/models`` lists every model there.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve

from rayloop.config import Settings
from rayloop.data.capture import CaptureClient, utcnow
from rayloop.serving.auth import KeyChecker, load_key_hashes
from rayloop.serving.protocol import (
    CAPTURE_HEADER,
    REQUEST_ID_HEADER,
    SESSION_HEADER,
    USER_HEADER,
    VERSION_HEADER,
    ReplyHead,
    ReplyTail,
    openai_error,
    served_model_id,
)
from rayloop.serving.routing import slot_for_version

if TYPE_CHECKING:
    from rayloop.registry import Registry

logger = logging.getLogger("ray.serve")

app = FastAPI(title="rayloop", docs_url=None, redoc_url=None)

RETRY_AFTER_S = 1
PEER_LISTING_S = 10.0  # how long /v1/models waits for another model's app to list itself
CLIENT_DISCONNECTED = "client disconnected"
# Request ids this service issues (uuid4 hex); feedback for one may briefly precede its capture row.
_ISSUED_ID = re.compile(r"[0-9a-f]{32}")
_NOT_SAMPLING = {"messages", "prompt", "model", "stream", "user", "request_id"}
# Not passed on when a request is forwarded to another model's app (the transport's own headers).
_NOT_FORWARDED = {"content-length", "host", "transfer-encoding", "connection", "content-encoding"}


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback`` body."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200, description="x-rayloop-request-id (or the response's id).")
    # Strict: only a JSON integer; "1", 1.0 and true are refused rather than converted.
    rating: int | None = Field(default=None, ge=-1, le=1, strict=True, description="-1 bad, 0 neutral, +1 good.")
    correction: str | None = Field(default=None, max_length=100_000, description="What the answer should have been.")
    user_id: str | None = Field(default=None, max_length=200, description="Who gave the feedback.")

    @field_validator("correction")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("a correction must not be empty or only white space (leave it out instead)")
        return v

    @model_validator(mode="after")
    def _something(self) -> FeedbackRequest:
        if self.rating is None and self.correction is None:
            raise ValueError("give a rating (-1, 0, 1) and/or a correction")
        return self


def _error(
    status: int, message: str, err_type: str, rid: str, param: str | None = None, **headers: str
) -> JSONResponse:
    return JSONResponse(
        openai_error(status, message, err_type, param), status_code=status, headers={REQUEST_ID_HEADER: rid, **headers}
    )


def _unavailable(message: str, rid: str, *, retry_after: float = 5) -> JSONResponse:
    """A 503 the client should retry after ``retry_after`` seconds (OpenAI's ServiceUnavailableError)."""
    return _error(503, message, "ServiceUnavailableError", rid, **{"Retry-After": f"{retry_after:g}"})


# Request bodies. Every refusal is an OpenAI-style error naming the problem, never an exception (a 500).
MAX_JSON_DEPTH = 100  # arrays/objects nested in a body; Python's json itself stops near 1000 with RecursionError
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # how a lone surrogate gets into a strict-UTF-8 body
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class BodyError:
    """Why a request body was refused: the HTTP status and the OpenAI error's message, type and param."""

    status: int
    message: str
    err_type: str = "BadRequestError"
    param: str | None = None


def _too_large(limit: int) -> BodyError:
    return BodyError(413, f"request body is larger than {limit} bytes (serving.max_body_bytes)", "PayloadTooLargeError")


def check_content_length(value: str | None, limit: int) -> BodyError | None:
    """Refuse a request by its ``Content-Length`` header alone (none: the body is read up to ``limit``)."""
    if value is None:
        return None
    if not _DIGITS.fullmatch(value.strip()):
        return BodyError(400, "the Content-Length header is not a byte count")
    digits = value.strip().lstrip("0")  # its length first: int() refuses more than 4300 digits
    return _too_large(limit) if len(digits) > len(str(limit)) or int(digits or "0") > limit else None


async def read_body(request: Request, limit: int) -> bytes | BodyError:
    """The body of ``request``, reading no more than ``limit`` (plus one chunk) bytes of it."""
    refused = check_content_length(request.headers.get("content-length"), limit)
    if refused is not None:
        return refused
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            return _too_large(limit)
    return bytes(raw)


def _path(parts: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in parts)


def _check_nodes(body: Any) -> BodyError | None:
    """The first string (or key) holding a lone UTF-16 surrogate, or container nested too deeply, in ``body``."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                where = _path(path) or None
                return BodyError(
                    400, f"request body holds a lone UTF-16 surrogate escape in {where or 'the body'}", param=where
                )
            continue
        if not isinstance(node, dict | list):
            continue
        if len(path) >= MAX_JSON_DEPTH:
            return BodyError(400, f"request body nests arrays/objects more than {MAX_JSON_DEPTH} deep")
        if isinstance(node, dict):
            for key in node:
                if _SURROGATE.search(key):
                    where = _path(path) or None
                    return BodyError(
                        400,
                        f"request body holds a lone UTF-16 surrogate escape in a key of {where or 'the body'}",
                        param=where,
                    )
            children: list[tuple[str | int, Any]] = list(node.items())
        else:
            children = list(enumerate(node))
        stack.extend((v, (*path, k)) for k, v in reversed(children))
    return None


def parse_json_body(raw: bytes, limit: int) -> dict[str, Any] | BodyError:
    """A request body as a JSON object, or why it is refused.

    Refused: more than ``limit`` bytes (413); not UTF-8 (UTF-8-encoded surrogates included); not JSON; arrays
    or objects nested more than :data:`MAX_JSON_DEPTH` deep; a string or key with a lone UTF-16 surrogate
    escape (``"\\ud800"``: it cannot be encoded again, in a reply, a log or a captured row); not an object.
    """
    if len(raw) > limit:
        return _too_large(limit)
    try:
        # Strict UTF-8 (a BOM allowed, as before): json.loads(bytes) would also take UTF-16/32 and let
        # UTF-8-encoded surrogates through ("surrogatepass").
        text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as e:
        return BodyError(400, f"request body is not valid UTF-8 ({e.reason} at byte {e.start})")
    try:
        body = json.loads(text)
    except RecursionError:
        return BodyError(400, f"request body nests arrays/objects more than {MAX_JSON_DEPTH} deep")
    except ValueError as e:
        return BodyError(400, f"request body is not valid JSON: {e}")
    # Walked only where the raw bytes allow a problem: enough brackets to nest too deep, or a surrogate escape.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH or _SURROGATE_ESCAPE.search(raw):
        refused = _check_nodes(body)
        if refused is not None:
            return refused
    if not isinstance(body, dict):
        return BodyError(400, f"request body must be a JSON object, not {type(body).__name__}")
    return body


def capture_allowed(request: Request, no_capture: KeyChecker) -> bool:
    """False when the request opted out (``x-rayloop-capture: off``) or came with a no-capture key."""
    if request.headers.get(CAPTURE_HEADER, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    return not (no_capture.enabled and no_capture.allows(request.headers.get("authorization")))


def row_status(status: int, tail: ReplyTail) -> str:
    """An interaction row's status: ``ok``; ``client_error`` (a 4xx, or the client left: nothing the answering
    version did); ``error`` (the server's fault: 5xx, an engine error, also one that came mid-stream after a 200).
    Only ``ok`` rows become training data; only ``error`` counts against a version in a rollout."""
    if status == 200 and tail.error is None:
        return "ok"
    if 400 <= status < 500 or tail.error == CLIENT_DISCONNECTED:
        return "client_error"
    return "error"


def _strip_request_id(rid: str) -> str:
    for prefix in ("chatcmpl-", "cmpl-"):
        if rid.startswith(prefix):
            return rid[len(prefix) :]
    return rid


async def _aclose(gen: Any, *, cancel: bool = False) -> None:
    """Close a slot's answer stream: a local slot's generator (EngineIngress) must be closed to stop the engine's
    work; Serve's response generators have no ``aclose`` (Serve cancels them on a disconnect; ``cancel`` does it
    here, for an answer the ingress drops)."""
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        await aclose()
    elif cancel:
        gen.cancel()


ALIAS_TTL_S = 5.0
"""How long a replica keeps an alias -> version lookup for ``NAME@ALIAS`` requests."""


@dataclass(frozen=True)
class Pin:
    """Where a ``NAME@REF`` request goes: the slot serving that version now."""

    slot: str
    version: int


@dataclass
class _Forwarded:
    """What the ingress reads of a request (its headers), for one another app forwarded."""

    headers: Any


class _RequestCtx:
    """One request in flight through the ingress."""

    def __init__(
        self,
        ing: OpenAIIngress,
        endpoint: str,
        slot: str,
        rid: str,
        body: dict[str, Any],
        request: Request,
        started: float,
        head: ReplyHead,
    ) -> None:
        self.ing, self.endpoint, self.slot, self.rid, self.body = ing, endpoint, slot, rid, body
        self.request, self.started, self.head = request, started, head
        self.timestamp = utcnow()
        self.tags = {"model": head.model, "version": str(head.version), "slot": slot}
        self._done = False
        ing.metrics.inc_in_flight(self.tags, 1)

    def finish(self, status: int, tail: ReplyTail) -> Awaitable[bool] | None:
        """Count and record the request; returns what to await before the response completes (the capture
        writer's acknowledgement of its row, ``serving.capture_ack``), if anything."""
        if self._done:
            return None
        self._done = True
        self.ing.metrics.inc_in_flight(self.tags, -1)
        return self.ing.record(self, status, tail, (time.monotonic() - self.started) * 1000.0)

    async def relay(self, gen: Any) -> AsyncIterator[str]:
        tail: ReplyTail | None = None
        try:
            async for item in gen:
                if isinstance(item, ReplyTail):
                    tail = item
                else:
                    yield item
        except Exception as e:
            logger.warning("stream of request %s broke: %s", self.rid, e)
            tail = ReplyTail(error=f"{type(e).__name__}: {e}")
            msg = json.dumps(openai_error(500, f"stream interrupted on request {self.rid}", "InternalServerError"))
            yield f"data: {msg}\n\n"
        finally:
            if tail is None:
                tail = ReplyTail(error=CLIENT_DISCONNECTED)
            acked = self.finish(200, tail)
            # A local slot's generator (EngineIngress) must be closed here to stop the engine's work on a
            # disconnect; Serve's response generators have no aclose and are cancelled by Serve itself.
            await _aclose(gen)
            if acked is not None:  # the stream ends only once its row is safe
                await acked


@serve.ingress(app)
class OpenAIIngress:
    """OpenAI-compatible ingress over engine slots.

    Args:
        slots: slot name -> handle of an :class:`~rayloop.serving.server.LLMServer` deployment.
        settings: ``Settings`` as a dict.
        model: the model name clients use.
        api_key_hashes: sha256 hashes of accepted bearer keys (besides those in env/file).
    """

    def __init__(
        self, slots: dict[str, Any], settings: dict[str, Any], model: str, api_key_hashes: list[str] | None = None
    ) -> None:
        self.settings = Settings.model_validate(settings)
        self.slots = dict(slots)
        self.model = model
        sv = self.settings.serving
        self.no_capture_keys = KeyChecker(load_key_hashes(sv, keys_env=sv.no_capture_api_keys_env))
        self.keys = KeyChecker(load_key_hashes(sv) | set(api_key_hashes or []) | self.no_capture_keys.hashes)
        from rayloop.serving.metrics import serving_metrics

        self.metrics = serving_metrics(sv.metrics)
        from rayloop.serving.peers import Peers

        self.peers = Peers()
        self._peer_handles: dict[str, Any] = {}
        self._aliases: dict[str, tuple[int | None, float]] = {}
        self._registry: Registry | None = None
        self.capture: CaptureClient | None = None
        if self.settings.serving.capture:
            self.capture = CaptureClient.for_settings(self.settings, on_drop=self.metrics.observe_dropped)

    # Whether other replicas of this deployment record capture rows too (flush waits for theirs).
    capture_peers = False

    def slot_handle(self, slot: str, *, stream: bool = False) -> Any:
        """The handle of ``slot``'s engine deployment, over gRPC when ``serving.grpc_handles`` is on."""
        handle = self.slots[slot]
        if self.settings.serving.grpc_handles:
            return handle.options(stream=stream, _by_reference=False)
        return handle.options(stream=stream)

    # -- routing hooks (EngineIngress implements them) ------------------------
    def pick_slot(self, endpoint: str, body: dict[str, Any], request: Request) -> str:
        """Which slot answers (here: always stable)."""
        return "stable"

    def after_response(self, slot: str, row: dict[str, Any]) -> None:
        """Called with every interaction row (the router mirrors to the shadow slot here)."""

    def on_failure(self, slot: str, request_id: str, error: Exception, latency_ms: float) -> None:
        """Called when ``slot`` failed before any engine answered (no row); the router counts it as an error."""

    # -- routes ------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._openai("completion", request)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        rid = uuid.uuid4().hex
        if not self.keys.allows(request.headers.get("authorization")):
            return _error(401, "missing or invalid API key", "AuthenticationError", rid)
        try:
            listing = await self.model_listing()
        except Exception as e:
            return self._serve_error(e, rid)
        data = list(listing.get("data") or [])
        for app_name in await self._peer_apps(fresh=True):
            try:
                # Bounded: a handle to an app removed since it was read waits for replicas that never come.
                other = await asyncio.wait_for(self._peer_handle(app_name).model_listing.remote(), PEER_LISTING_S)
            except Exception as e:  # one model's app being down (or gone) must not hide the others
                logger.warning("listing the models of app %s failed: %s", app_name, e)
                continue
            seen = {m.get("id") for m in data}
            data += [m for m in other.get("data") or [] if m.get("id") not in seen]
        return JSONResponse({**listing, "data": data}, headers={REQUEST_ID_HEADER: rid})

    async def model_listing(self) -> dict[str, Any]:
        """This app's own ``/v1/models`` listing (other apps' ingresses call it through a handle)."""
        listing: dict[str, Any] = await self.slot_handle("stable").models.remote()
        return listing

    # -- other models behind the same endpoint -------------------------------
    def _own_app(self) -> str:
        return serve.get_replica_context().app_name

    async def _peer_apps(self, *, fresh: bool = False) -> list[str]:
        """The other apps serving models behind this endpoint (none when they cannot be read now)."""
        try:
            models = await self.peers.models(fresh=fresh)
        except Exception as e:
            logger.warning("reading the other models' apps failed: %s", e)
            return []
        own = self._own_app()
        return sorted({a for m, a in models.items() if m != self.model and a != own})

    def _peer_handle(self, app_name: str) -> Any:
        from rayloop.serving.app import slot_deployment_name
        from rayloop.serving.routing import STABLE

        handle = self._peer_handles.get(app_name)
        if handle is None:
            handle = self._peer_handles[app_name] = serve.get_deployment_handle(slot_deployment_name(STABLE), app_name)
        return handle

    async def _forward(
        self, app_name: str, endpoint: str, body: dict[str, Any], request: Request, rid: str
    ) -> Response:
        """Answer through the app of the model ``body`` names: it runs the request as its own."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        gen = self._peer_handle(app_name).options(stream=True).forwarded.remote(endpoint, body, headers)
        try:
            head = await gen.__anext__()
        except Exception as e:
            return self._serve_error(e, rid)
        if "body" in head:
            return Response(
                head["body"], status_code=head["status"], headers=head["headers"], media_type=head["media_type"]
            )
        return StreamingResponse(
            gen, status_code=head["status"], headers=head["headers"], media_type=head["media_type"]
        )

    async def forwarded(self, endpoint: str, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[Any]:
        """A request another app's ingress forwarded (its ``model`` names this app's): answered as if it had
        come here. Yields the response head (``status``, ``headers``, ``media_type`` and, unless streamed,
        ``body``), then the stream's chunks."""
        from starlette.datastructures import Headers

        started = time.monotonic()
        rid = uuid.uuid4().hex
        request = _Forwarded(Headers(headers=headers))
        if not self.keys.allows(request.headers.get("authorization")):
            response: Response = _error(401, "missing or invalid API key", "AuthenticationError", rid)
        else:
            response = await self._answer_model(endpoint, body, request, rid, started)  # type: ignore[arg-type]
        head = {
            "status": response.status_code,
            "headers": {k: v for k, v in response.headers.items() if k.lower() not in _NOT_FORWARDED},
            "media_type": response.media_type,
        }
        if isinstance(response, StreamingResponse):
            yield head
            async for chunk in response.body_iterator:
                yield chunk
        else:
            yield {**head, "body": bytes(response.body)}

    @app.post("/v1/feedback")
    async def feedback(self, request: Request) -> Response:
        rid = uuid.uuid4().hex
        if not self.keys.allows(request.headers.get("authorization")):
            return _error(401, "missing or invalid API key", "AuthenticationError", rid)
        body = await self._json(request, rid)
        if isinstance(body, Response):
            return body
        try:
            fb = FeedbackRequest.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or None
            return _error(400, f"invalid feedback: {loc or '(body)'}: {err['msg']}", "BadRequestError", rid, loc)
        if self.capture is None:
            return _error(409, "interaction capture is disabled, so feedback cannot be joined", "ConflictError", rid)
        target = _strip_request_id(fb.request_id)
        try:
            found = await self._lookup(target)
        except Exception as e:
            logger.warning("feedback lookup failed: %s", e)
            return _unavailable("the interaction store is unavailable; retry", rid)
        if found is None:
            return _error(404, f"no interaction with request_id {fb.request_id!r}", "NotFoundError", rid, "request_id")
        row = {
            "request_id": target,
            "timestamp": utcnow(),
            "rating": fb.rating,
            "correction": fb.correction,
            "user_id": fb.user_id or request.headers.get(USER_HEADER),
            "model_name": found["model_name"],
            "model_version": found["model_version"],
        }
        self.capture.record("feedback", row)
        self.metrics.observe_feedback(found["model_name"], int(found["model_version"]), fb.rating)
        return JSONResponse(
            {"object": "feedback", "request_id": target, "status": "recorded"},
            headers={REQUEST_ID_HEADER: rid, VERSION_HEADER: str(found["model_version"])},
        )

    async def _lookup(self, request_id: str) -> dict[str, Any] | None:
        """The captured interaction behind ``request_id``, waiting out the capture delay.

        A streamed reply is recorded just after its last chunk, and another
        ingress replica ships its rows within ``capture_flush_s``: an id this
        service issued but not yet found is looked up again until then.
        """
        assert self.capture is not None
        if not _ISSUED_ID.fullmatch(request_id):
            return None  # not an id this service issues: nothing to look up
        found = await self.capture.lookup(request_id)
        if found is not None:
            return found
        deadline = time.monotonic() + self.settings.serving.capture_flush_s + 1.0
        delay = 0.05
        while found is None and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            found = await self.capture.lookup(request_id)
        return found

    @app.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        """Liveness for probes (no key needed); what the replica serves only with a key (or when none is set)."""
        try:
            info = await self.slot_handle("stable").info.remote()
        except Exception as e:
            return JSONResponse({"status": "unhealthy", "error": type(e).__name__}, status_code=503)
        if self.keys.enabled and not self.keys.allows(request.headers.get("authorization")):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "slots": {"stable": info}})

    @app.post("/rayloop/flush")
    async def flush(self, request: Request) -> Response:
        """Write buffered capture rows now (tests and operators; same auth as the API)."""
        rid = uuid.uuid4().hex
        if not self.keys.allows(request.headers.get("authorization")):
            return _error(401, "missing or invalid API key", "AuthenticationError", rid)
        if self.capture is not None:
            await self.capture.flush(peers=self.capture_peers)
        return JSONResponse({"status": "flushed"})

    # -- the OpenAI path ----------------------------------------------------
    async def _json(self, request: Request, rid: str) -> dict[str, Any] | Response:
        """The request's body as a JSON object, or the error response (see :func:`parse_json_body`)."""
        limit = self.settings.serving.max_body_bytes
        raw = await read_body(request, limit)
        body = raw if isinstance(raw, BodyError) else parse_json_body(raw, limit)
        if isinstance(body, BodyError):
            return _error(body.status, body.message, body.err_type, rid, body.param)
        return body

    async def _openai(self, endpoint: str, request: Request) -> Response:
        started = time.monotonic()
        rid = uuid.uuid4().hex
        if not self.keys.allows(request.headers.get("authorization")):
            return _error(401, "missing or invalid API key", "AuthenticationError", rid)
        body = await self._json(request, rid)
        if isinstance(body, Response):
            return body
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str):
                return _error(
                    400, f"model must be a string, not {type(model).__name__}", "BadRequestError", rid, "model"
                )
            name = model.partition("@")[0]
            if name != self.model:
                try:
                    other = await self.peers.app_for(name)
                except Exception as e:
                    logger.warning("looking up the app of model %r failed: %s", name, e)
                    return _unavailable("the model directory is unavailable; retry", rid)
                if other is None or other == self._own_app():
                    served = sorted({self.model, *(await self.peers.models())})
                    return _error(
                        404,
                        f"The model `{model}` does not exist; this endpoint serves "
                        + ", ".join(repr(m) for m in served),
                        "NotFoundError",
                        rid,
                        "model",
                    )
                return await self._forward(other, endpoint, body, request, rid)
        return await self._answer_model(endpoint, body, request, rid, started)

    async def _answer_model(
        self, endpoint: str, body: dict[str, Any], request: Request, rid: str, started: float
    ) -> Response:
        """Answer a request whose ``model`` names this app's model: ``NAME`` goes where the route table sends
        it; ``NAME@REF`` (a version ``N``/``vN`` or an alias) pins it to the slot serving that version."""
        model = body.get("model")
        pin: Pin | None = None
        if isinstance(model, str) and "@" in model:
            got = await self._pin(model, rid)
            if isinstance(got, Response):
                return got
            pin = got
        body["model"] = self.model
        return await self._answer(endpoint, body, request, rid, started, pin)

    def served_slots(self) -> dict[str, int]:
        """The slots users may be sent to and the version each serves now (the router knows them)."""
        return {}

    async def alias_version(self, alias: str) -> int | None:
        """The version ``alias`` (or ``latest``) of this app's model points at, from the registry (cached for
        :data:`ALIAS_TTL_S`); None when there is no such alias."""
        now = time.monotonic()
        hit = self._aliases.get(alias)
        if hit is not None and now - hit[1] < ALIAS_TTL_S:
            return hit[0]
        version = await asyncio.to_thread(self._read_alias, alias)
        self._aliases[alias] = (version, now)
        return version

    def _read_alias(self, alias: str) -> int | None:
        from rayloop.errors import NotFoundError
        from rayloop.registry import Registry

        if self._registry is None:
            self._registry = Registry.from_settings(self.settings)
        try:
            return self._registry.resolve(f"{self.model}@{alias}").version
        except NotFoundError:
            return None

    async def _pin(self, model: str, rid: str) -> Pin | Response:
        """The slot and version a ``NAME@REF`` request is pinned to, or the error answering it."""
        from rayloop.errors import InvalidNameError
        from rayloop.registry.names import parse_ref

        try:
            ref = parse_ref(model)
        except InvalidNameError as e:
            return _error(
                400, f"model {model!r} is not NAME, NAME@N or NAME@ALIAS: {e}", "BadRequestError", rid, "model"
            )
        version = ref.version
        if version is None:
            assert ref.alias is not None
            try:
                version = await self.alias_version(ref.alias)
            except Exception as e:
                logger.warning("resolving %s in the registry failed: %s", model, e)
                return _unavailable("the model registry is unavailable; retry", rid)
            if version is None:
                return _error(
                    404,
                    f"The model `{model}` does not exist: {self.model} has no alias {ref.alias!r}",
                    "NotFoundError",
                    rid,
                    "model",
                )
        served = self.served_slots()
        slot = slot_for_version(served, version)
        if slot is None:
            listed = ", ".join(served_model_id(self.model, v) for v in sorted(set(served.values())))
            return _error(
                404,
                f"The model `{model}` (version {version}) is not served here; served now: {listed or 'none'}",
                "NotFoundError",
                rid,
                "model",
            )
        return Pin(slot, version)

    async def _answer(
        self, endpoint: str, body: dict[str, Any], request: Request, rid: str, started: float, pin: Pin | None = None
    ) -> Response:
        """Answer an authenticated, parsed request for this app's model through the slot :meth:`pick_slot` picks
        (or the one it is pinned to)."""
        slot = pin.slot if pin is not None else self.pick_slot(endpoint, body, request)
        handle = self.slot_handle(slot, stream=True)
        gen = (handle.chat if endpoint == "chat" else handle.completion).remote(body, rid)
        try:
            head = await gen.__anext__()
        except Exception as e:
            try:
                self.on_failure(slot, rid, e, (time.monotonic() - started) * 1000.0)
            except Exception:
                logger.exception("on_failure hook failed")
            return self._serve_error(e, rid)
        assert isinstance(head, ReplyHead)
        if pin is not None and head.version != pin.version:
            # The slot moved to another version between the pick and the answer (a swap in progress):
            # never hand a pinned client another version's answer.
            await _aclose(gen, cancel=True)
            return _unavailable(
                f"version {pin.version} of {self.model} is being replaced on this replica; retry", rid, retry_after=1
            )
        ctx = _RequestCtx(self, endpoint, slot, rid, body, request, started, head)
        headers = {REQUEST_ID_HEADER: rid}
        if head.version:
            headers[VERSION_HEADER] = str(head.version)
            headers["x-rayloop-model"] = served_model_id(head.model, head.version)
        if head.status == 503:
            headers["Retry-After"] = "5"
        if not head.streaming:
            acked = ctx.finish(head.status, head.tail or ReplyTail())
            if acked is not None:
                await acked
            return JSONResponse(head.body, status_code=head.status, headers=headers)
        return StreamingResponse(ctx.relay(gen), media_type="text/event-stream", headers=headers)

    def _serve_error(self, e: Exception, rid: str) -> Response:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(e, BackPressureError):
            return _unavailable("the model is overloaded; retry later", rid, retry_after=RETRY_AFTER_S)
        if isinstance(e, DeploymentUnavailableError):
            return _unavailable("no engine replica is available; retry later", rid)
        logger.exception("request %s failed in the engine replica", rid)
        return _error(500, f"internal error on request {rid} ({type(e).__name__})", "InternalServerError", rid)

    def record(self, ctx: _RequestCtx, status: int, tail: ReplyTail, latency_ms: float) -> Awaitable[bool] | None:
        head = ctx.head
        tags = {"model": head.model or self.model, "version": str(head.version), "slot": ctx.slot}
        self.metrics.observe_request(
            tags,
            ctx.endpoint,
            status,
            latency_ms / 1000.0,
            None if tail.ttft_ms is None else tail.ttft_ms / 1000.0,
            tail.prompt_tokens,
            tail.completion_tokens,
        )
        if not head.version:
            return None
        body = ctx.body
        prompt = body.get("prompt")
        row = {
            "request_id": ctx.rid,
            "timestamp": ctx.timestamp,
            "session_id": ctx.request.headers.get(SESSION_HEADER),
            "user_id": ctx.request.headers.get(USER_HEADER)
            or (body.get("user") if isinstance(body.get("user"), str) else None),
            "model_name": head.model,
            "model_version": head.version,
            "slot": ctx.slot,
            "endpoint": ctx.endpoint,
            "messages": json.dumps(body.get("messages"), ensure_ascii=False, default=str)
            if ctx.endpoint == "chat"
            else None,
            "prompt": None
            if ctx.endpoint == "chat"
            else (prompt if isinstance(prompt, str) else json.dumps(prompt, default=str)),
            "completion": tail.text if status == 200 else None,
            "choices": json.dumps(tail.choices, ensure_ascii=False) if status == 200 and tail.choices else None,
            "sampling_params": json.dumps({k: v for k, v in body.items() if k not in _NOT_SAMPLING}, default=str),
            "prompt_tokens": tail.prompt_tokens,
            "completion_tokens": tail.completion_tokens,
            "latency_ms": latency_ms,
            "ttft_ms": tail.ttft_ms,
            "status": row_status(status, tail),
            "error": tail.error,
            "finish_reason": tail.finish_reason,
        }
        acked: Awaitable[bool] | None = None
        if not capture_allowed(ctx.request, self.no_capture_keys):
            row["opted_out"] = True  # stats may count it; nothing of it is stored, shadow copies included
        elif self.capture is not None:
            sv = self.settings.serving
            if sv.capture_ack:
                acked = self.capture.record_acked("interactions", row, sv.capture_ack_timeout_s)
            else:
                self.capture.record("interactions", row)
        try:
            self.after_response(ctx.slot, row)
        except Exception:
            logger.exception("after_response hook failed")
        return acked

    async def __del__(self) -> None:
        # Graceful shutdown: rows still queued here reach Parquet.
        if self.capture is not None:
            await self.capture.close()
