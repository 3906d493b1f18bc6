"""``model: NAME@REF`` pins a request to the version REF names (a version or an alias), served by the stable or the
canary slot; a version that is not served is a 404 naming what is, and a slot that changed version under the
request is a 503 (never another version's answer). The ingress's methods run on a stand-in, without Ray."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from rayloop.serving.ingress import OpenAIIngress, Pin
from rayloop.serving.protocol import ReplyHead, ReplyTail
from rayloop.serving.routing import CANARY, SHADOW, STABLE, slot_for_version

pytestmark = pytest.mark.unit


def test_slot_for_version_prefers_stable_and_never_picks_shadow() -> None:
    assert slot_for_version({STABLE: 1, CANARY: 2}, 1) == STABLE
    assert slot_for_version({STABLE: 1, CANARY: 2}, 2) == CANARY
    assert slot_for_version({STABLE: 2, CANARY: 2}, 2) == STABLE
    assert slot_for_version({STABLE: 1, SHADOW: 3}, 3) is None
    assert slot_for_version({}, 1) is None


class _Slot:
    """A slot handle whose engine answers as ``version`` (and records that it was asked and closed)."""

    def __init__(self, version: int) -> None:
        self.version, self.asked, self.closed = version, 0, 0

    def chat_stream(self, body: dict[str, Any], rid: str) -> AsyncIterator[Any]:
        self.asked += 1

        async def gen() -> AsyncIterator[Any]:
            try:
                tail = ReplyTail(text="Drouth", completion_tokens=1)
                yield ReplyHead(200, "demo", self.version, body={"model": f"demo@v{self.version}"}, tail=tail)
            finally:
                self.closed += 1

        return gen()

    @property
    def chat(self) -> SimpleNamespace:
        return SimpleNamespace(remote=self.chat_stream)


def _ingress(served: dict[str, int], aliases: dict[str, int], slots: dict[str, _Slot]) -> SimpleNamespace:
    lookups: list[str] = []

    async def alias_version(alias: str) -> int | None:
        lookups.append(alias)
        return aliases.get(alias)

    ing = SimpleNamespace(model="demo", served_slots=lambda: served, alias_version=alias_version, lookups=lookups)
    ing.slot_handle = lambda slot, stream=False: slots[slot]
    ing.pick_slot = lambda endpoint, body, request: STABLE
    ing.on_failure = lambda *a: None
    ing.recorded = []
    ing.record = lambda ctx, status, tail, latency: ing.recorded.append((ctx.slot, status))
    ing.metrics = SimpleNamespace(inc_in_flight=lambda tags, n: None)
    ing._pin = functools.partial(OpenAIIngress._pin, ing)  # type: ignore[arg-type]
    ing._answer = functools.partial(OpenAIIngress._answer, ing)  # type: ignore[arg-type]
    return ing


def _pin(ing: SimpleNamespace, model: str) -> Pin | tuple[int, dict[str, Any]]:
    got = asyncio.run(OpenAIIngress._pin(ing, model, "rid"))  # type: ignore[arg-type]
    if isinstance(got, Pin):
        return got
    return got.status_code, json.loads(bytes(got.body))["error"]


def test_versions_and_aliases_pin_to_the_slot_serving_them() -> None:
    ing = _ingress({STABLE: 2, CANARY: 3}, {"production": 2, "candidate": 3, "previous": 1}, {})
    assert _pin(ing, "demo@2") == Pin(STABLE, 2)
    assert _pin(ing, "demo@v3") == Pin(CANARY, 3)
    assert _pin(ing, "demo@production") == Pin(STABLE, 2)
    assert _pin(ing, "demo@candidate") == Pin(CANARY, 3)
    assert ing.lookups == ["production", "candidate"]


@pytest.mark.parametrize(
    ("model", "status", "message"),
    [
        ("demo@1", 404, "The model `demo@1` (version 1) is not served here; served now: demo@v2, demo@v3"),
        ("demo@previous", 404, "The model `demo@previous` (version 1) is not served here; served now: demo@v2"),
        ("demo@staging", 404, "The model `demo@staging` does not exist: demo has no alias 'staging'"),
        ("demo@v0", 400, "model 'demo@v0' is not NAME, NAME@N or NAME@ALIAS"),
        ("demo@", 400, "model 'demo@' is not NAME, NAME@N or NAME@ALIAS"),
        ("demo@no/slash", 400, "model 'demo@no/slash' is not NAME, NAME@N or NAME@ALIAS"),
    ],
)
def test_refs_that_cannot_be_served_are_4xx_naming_what_is(model: str, status: int, message: str) -> None:
    served = {STABLE: 2, CANARY: 3} if model == "demo@1" else {STABLE: 2}
    got = _pin(_ingress(served, {"production": 2, "previous": 1}, {}), model)
    assert isinstance(got, tuple) and got[0] == status, got
    assert got[1]["message"].startswith(message) and got[1]["param"] == "model", got


def test_an_unreachable_registry_is_a_503_not_a_guess() -> None:
    ing = _ingress({STABLE: 2}, {}, {})

    async def broken(alias: str) -> int | None:
        raise ConnectionError("registry down")

    ing.alias_version = broken
    got = asyncio.run(OpenAIIngress._pin(ing, "demo@production", "rid"))  # type: ignore[arg-type]
    assert not isinstance(got, Pin) and got.status_code == 503 and got.headers["retry-after"] == "5"


def _request() -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive)


def test_a_pinned_request_goes_to_its_slot_and_never_gets_another_versions_answer() -> None:
    stable, canary = _Slot(2), _Slot(3)
    ing = _ingress({STABLE: 2, CANARY: 3}, {}, {STABLE: stable, CANARY: canary})
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    resp = asyncio.run(OpenAIIngress._answer(ing, "chat", dict(body), _request(), "rid", 0.0, Pin(CANARY, 3)))  # type: ignore[arg-type]
    assert resp.status_code == 200 and json.loads(bytes(resp.body))["model"] == "demo@v3"
    assert (stable.asked, canary.asked) == (0, 1) and ing.recorded == [(CANARY, 200)]
    # The canary slot now answers as v4 (replaced between the pick and the answer): a 503 to retry, nothing
    # recorded as an answer of v3, and the slot's stream closed.
    canary.version = 4
    resp = asyncio.run(OpenAIIngress._answer(ing, "chat", dict(body), _request(), "rid", 0.0, Pin(CANARY, 3)))  # type: ignore[arg-type]
    error = json.loads(bytes(resp.body))["error"]
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1", error
    assert error["message"] == "version 3 of demo is being replaced on this replica; retry"
    assert canary.closed == 2 and ing.recorded == [(CANARY, 200)]
