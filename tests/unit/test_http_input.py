"""What the ingress accepts as a request body and as feedback: refusals are OpenAI-style 4xx errors, never 500s.

No Ray: the parsing functions are pure, and the routes run as plain coroutines on a stand-in ingress
(``OpenAIIngress``'s methods with the attributes they use) over Starlette requests built here.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from rayloop.config import Settings
from rayloop.serving.auth import KeyChecker
from rayloop.serving.ingress import (
    MAX_JSON_DEPTH,
    BodyError,
    FeedbackRequest,
    OpenAIIngress,
    check_content_length,
    parse_json_body,
    read_body,
)

pytestmark = pytest.mark.unit

LIMIT = 1000


# -- parse_json_body ---------------------------------------------------------------------------------------------
def test_parse_json_body_accepts_objects() -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "héllo 😀 \\ud800 as text"}]}
    assert parse_json_body(json.dumps(body).encode(), LIMIT) == body
    assert parse_json_body(json.dumps(body, ensure_ascii=False).encode(), LIMIT) == body
    assert parse_json_body(b'{"a": "\\ud83d\\ude00"}', LIMIT) == {"a": "😀"}  # a surrogate *pair* is one character
    assert parse_json_body(b"\xef\xbb\xbf{}", LIMIT) == {}  # a UTF-8 BOM, accepted as json.loads(bytes) did
    nested: Any = "x"
    for _ in range(MAX_JSON_DEPTH - 1):
        nested = [nested]
    assert parse_json_body(json.dumps({"a": nested}).encode(), 10 * LIMIT) == {"a": nested}
    brackets = {"content": "[" * 500 + "{" * 500}  # many brackets, in a string: not nesting
    assert parse_json_body(json.dumps(brackets).encode(), 10 * LIMIT) == brackets
    assert parse_json_body(b"{}", 2) == {}  # exactly the limit


@pytest.mark.parametrize(
    ("raw", "status", "message", "param"),
    [
        (b"{}" + b" " * LIMIT, 413, f"request body is larger than {LIMIT} bytes (serving.max_body_bytes)", None),
        (b"[" * 100_000, 413, "request body is larger than", None),
        (b"[" * 450 + b"]" * 450, 400, f"request body nests arrays/objects more than {MAX_JSON_DEPTH} deep", None),
        (b'{"a":' * 101 + b"1" + b"}" * 101, 400, "request body nests arrays/objects more than 100 deep", None),
        (b'{"a": "\xff"}', 400, "request body is not valid UTF-8 (invalid start byte at byte 7)", None),
        (b'{"a": "\xc3"}', 400, "request body is not valid UTF-8 (invalid continuation byte at byte 7)", None),
        (b'{"a": "\xed\xa0\x80"}', 400, "request body is not valid UTF-8", None),  # an encoded surrogate
        ('{"a": 1}'.encode("utf-16"), 400, "request body is not valid UTF-8", None),
        (b'{"model": "demo\\ud800"}', 400, "request body holds a lone UTF-16 surrogate escape in model", "model"),
        (b'{"model": "\\uDFFF"}', 400, "request body holds a lone UTF-16 surrogate escape in model", "model"),
        (
            b'{"messages": [{"role": "user", "content": "a\\udc00b"}]}',
            400,
            "request body holds a lone UTF-16 surrogate escape in messages.0.content",
            "messages.0.content",
        ),
        (b'{"\\ud800": 1}', 400, "request body holds a lone UTF-16 surrogate escape in a key of the body", None),
        (b'{"a": {"\\ud800": 1}}', 400, "request body holds a lone UTF-16 surrogate escape in a key of a", "a"),
        (b'"\\ud800"', 400, "request body holds a lone UTF-16 surrogate escape in the body", None),
        (b"", 400, "request body is not valid JSON: Expecting value: line 1 column 1 (char 0)", None),
        (b'{"a": 1', 400, "request body is not valid JSON: Expecting ',' delimiter", None),
        (b"[1, 2]", 400, "request body must be a JSON object, not list", None),
        (b"null", 400, "request body must be a JSON object, not NoneType", None),
    ],
    ids=[
        "too-large",
        "100k-open-brackets-too-large",
        "nested-450",
        "nested-101",
        "invalid-utf8",
        "truncated-utf8",
        "utf8-encoded-surrogate",
        "utf16",
        "lone-surrogate-in-model",
        "lone-low-surrogate-upper-case",
        "lone-surrogate-in-messages",
        "lone-surrogate-in-key",
        "lone-surrogate-in-nested-key",
        "lone-surrogate-body",
        "empty",
        "truncated-json",
        "array",
        "null",
    ],
)
def test_parse_json_body_refuses(raw: bytes, status: int, message: str, param: str | None) -> None:
    got = parse_json_body(raw, LIMIT)
    assert isinstance(got, BodyError), got
    assert (got.status, got.param) == (status, param)
    assert got.message.startswith(message), got.message
    assert got.err_type == ("PayloadTooLargeError" if status == 413 else "BadRequestError")
    json.dumps(got.message, ensure_ascii=False).encode()  # the message itself can be sent


def test_deep_nesting_past_the_recursion_limit_is_a_400() -> None:
    raw = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError here
    got = parse_json_body(raw, len(raw))
    assert isinstance(got, BodyError) and got.status == 400 and "nests" in got.message


def test_content_length() -> None:
    assert check_content_length(None, LIMIT) is None
    assert check_content_length(str(LIMIT), LIMIT) is None
    too_large = check_content_length(str(LIMIT + 1), LIMIT)
    assert too_large is not None and too_large.status == 413
    assert check_content_length("9" * 40, LIMIT) == too_large
    assert check_content_length("9" * 5000, LIMIT) == too_large  # more digits than int() takes
    assert check_content_length("0" * 5000 + "1", LIMIT) is None
    assert check_content_length(" 0 ", LIMIT) is None
    for bad in ("", "-1", "1e3", "0x10", "1_000", "²"):
        got = check_content_length(bad, LIMIT)
        assert got is not None and got.status == 400 and "Content-Length" in got.message


# -- reading a request --------------------------------------------------------------------------------------------
def _request(chunks: Iterable[bytes], headers: dict[str, str] | None = None, log: list[int] | None = None) -> Request:
    """A Starlette POST request whose body arrives as ``chunks`` (``log`` gets each chunk's size as it is read)."""
    it = iter(chunks)

    async def receive() -> dict[str, Any]:
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        if log is not None:
            log.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": True}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/feedback",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return Request(scope, receive)


def _endless(chunk: bytes) -> Iterable[bytes]:
    while True:
        yield chunk


def test_read_body_refuses_by_content_length_before_reading() -> None:
    log: list[int] = []
    got = asyncio.run(read_body(_request(_endless(b"x" * 100), {"content-length": str(LIMIT + 1)}, log), LIMIT))
    assert isinstance(got, BodyError) and got.status == 413
    assert log == []  # not a byte read


def test_read_body_stops_once_past_the_limit() -> None:
    log: list[int] = []
    # No Content-Length (chunked), or one that understates the body: reading stops at the first chunk past the limit.
    for headers in ({}, {"content-length": "10"}):
        log.clear()
        got = asyncio.run(read_body(_request(_endless(b"x" * 100), headers, log), LIMIT))
        assert isinstance(got, BodyError) and got.status == 413
        assert sum(log) == LIMIT + 100
    assert asyncio.run(read_body(_request([b'{"a"', b": 1}"], {"content-length": "8"}), LIMIT)) == b'{"a": 1}'


# -- the routes ---------------------------------------------------------------------------------------------------
def _ingress(max_body_bytes: int = LIMIT) -> SimpleNamespace:
    """What ``OpenAIIngress``'s routes use of ``self`` up to the engine call; capture off (valid feedback: 409)."""
    ing = SimpleNamespace(
        settings=Settings.model_validate({"serving": {"max_body_bytes": max_body_bytes}}),
        keys=KeyChecker(set()),
        capture=None,
        model="demo",
    )
    ing._json = functools.partial(OpenAIIngress._json, ing)  # type: ignore[arg-type]
    return ing


def _call(
    route: str, raw: bytes, headers: dict[str, str] | None = None, limit: int = LIMIT
) -> tuple[int, dict[str, Any]]:
    ing = _ingress(limit)
    request = _request([raw], headers)
    if route == "feedback":
        resp: Response = asyncio.run(OpenAIIngress.feedback(ing, request))  # type: ignore[arg-type]
    else:
        resp = asyncio.run(OpenAIIngress._openai(ing, route, request))  # type: ignore[arg-type]
    assert resp.headers["content-type"] == "application/json"
    assert "x-rayloop-request-id" in resp.headers
    return resp.status_code, json.loads(bytes(resp.body))


def _error(status: int, message: str, param: str | None, err_type: str = "BadRequestError") -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


@pytest.mark.parametrize("route", ["chat", "completion", "feedback"])
def test_routes_answer_bad_bodies_with_openai_errors(route: str) -> None:
    assert _call(route, b'{"model": "\\ud800", "request_id": "r", "rating": 1}') == (
        400,
        _error(400, "request body holds a lone UTF-16 surrogate escape in model", "model"),
    )
    assert _call(route, b"[" * 100_000 + b"]" * 100_000, {}) == (
        413,
        _error(
            413, f"request body is larger than {LIMIT} bytes (serving.max_body_bytes)", None, "PayloadTooLargeError"
        ),
    )
    for depth, limit in ((101, LIMIT), (100_000, 10**6)):  # found by the walk / by json's RecursionError
        status, body = _call(route, b"[" * depth + b"]" * depth, limit=limit)
        assert (status, body) == (400, _error(400, "request body nests arrays/objects more than 100 deep", None))
    status, body = _call(route, b'{"model": "\xff"}')
    assert status == 400 and body["error"]["message"].startswith("request body is not valid UTF-8")
    status, body = _call(route, b"{}", {"content-length": str(LIMIT + 1)})
    assert status == 413 and body["error"]["type"] == "PayloadTooLargeError"


def test_the_default_body_limit_is_4_mib() -> None:
    assert Settings().serving.max_body_bytes == 4 * 1024 * 1024


# -- feedback -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rating", [-1, 0, 1])
def test_feedback_takes_integer_ratings(rating: int) -> None:
    assert FeedbackRequest.model_validate({"request_id": "r", "rating": rating}).rating == rating
    assert _call("feedback", json.dumps({"request_id": "r", "rating": rating}).encode())[0] == 409  # past validation


@pytest.mark.parametrize(
    ("rating", "message"),
    [
        ("1", "Input should be a valid integer"),
        ("1.0", "Input should be a valid integer"),
        (1.0, "Input should be a valid integer"),
        (True, "Input should be a valid integer"),
        (False, "Input should be a valid integer"),
        (2, "Input should be less than or equal to 1"),
        (-2, "Input should be greater than or equal to -1"),
        (10**30, "Input should be less than or equal to 1"),
        ([1], "Input should be a valid integer"),
    ],
    ids=["string", "decimal-string", "float", "true", "false", "2", "-2", "10**30", "list"],
)
def test_feedback_refuses_ratings_that_are_not_json_integers_in_range(rating: Any, message: str) -> None:
    with pytest.raises(ValidationError) as e:
        FeedbackRequest.model_validate({"request_id": "r", "rating": rating})
    assert e.value.errors()[0]["loc"] == ("rating",)
    status, body = _call("feedback", json.dumps({"request_id": "r", "rating": rating}).encode())
    assert (status, body) == (400, _error(400, f"invalid feedback: rating: {message}", "rating"))


@pytest.mark.parametrize("correction", ["", " ", "\n\t  \r\n", "\u3000"])
def test_feedback_refuses_blank_corrections(correction: str) -> None:
    for extra in ({}, {"rating": 1}):
        with pytest.raises(ValidationError) as e:
            FeedbackRequest.model_validate({"request_id": "r", "correction": correction, **extra})
        assert e.value.errors()[0]["loc"] == ("correction",)
        status, body = _call("feedback", json.dumps({"request_id": "r", "correction": correction, **extra}).encode())
        message = "a correction must not be empty or only white space (leave it out instead)"
        assert (status, body) == (
            400,
            _error(400, f"invalid feedback: correction: Value error, {message}", "correction"),
        )


def test_feedback_keeps_corrections_with_text() -> None:
    fb = FeedbackRequest.model_validate({"request_id": "r", "correction": "  Drouth \n"})
    assert fb.correction == "  Drouth \n" and fb.rating is None  # kept as written
    assert _call("feedback", b'{"request_id": "r", "correction": "Drouth"}')[0] == 409
    status, body = _call("feedback", b'{"request_id": "r"}')
    assert (status, body) == (
        400,
        _error(400, "invalid feedback: (body): Value error, give a rating (-1, 0, 1) and/or a correction", None),
    )


def test_feedback_for_an_id_this_service_never_issues_is_404_without_a_lookup() -> None:
    class _NoLookups:
        calls = 0

        async def lookup(self, request_id: str) -> None:
            _NoLookups.calls += 1

    ing = _ingress()
    ing.capture = _NoLookups()
    ing._lookup = functools.partial(OpenAIIngress._lookup, ing)  # type: ignore[arg-type]
    for rid in ("r", "chatcmpl-" + "z" * 32, "x" * 200):
        request = _request([json.dumps({"request_id": rid, "rating": 1}).encode()], None)
        resp: Response = asyncio.run(OpenAIIngress.feedback(ing, request))  # type: ignore[arg-type]
        assert resp.status_code == 404, rid
    assert _NoLookups.calls == 0


def test_a_request_opts_out_of_capture_by_header_or_by_key() -> None:
    from rayloop.serving.auth import KeyChecker, hash_key
    from rayloop.serving.ingress import capture_allowed

    no_capture = KeyChecker({hash_key("sk-private")})
    assert capture_allowed(_request([b""], {}), no_capture)
    assert not capture_allowed(_request([b""], {"x-rayloop-capture": "off"}), no_capture)
    assert not capture_allowed(_request([b""], {"x-rayloop-capture": "OFF "}), no_capture)
    assert not capture_allowed(_request([b""], {"authorization": "Bearer sk-private"}), no_capture)
    assert capture_allowed(_request([b""], {"authorization": "Bearer sk-other"}), no_capture)
    assert capture_allowed(_request([b""], {"x-rayloop-capture": "on"}), KeyChecker(set()))
