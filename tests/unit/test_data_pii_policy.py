from __future__ import annotations

import pytest

from rayloop.config import DataSettings, UnratedPolicy
from rayloop.data.pii import scrub
from rayloop.data.policy import decide


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        ("write to bob.smith@example.co.uk today", "write to <email> today", {"email": 1}),
        ("call +1 (555) 123-4567 or 030 1234 5678", "call <phone> or <phone>", {"phone": 2}),
        ("key sk-abcdefghijklmnopqrstuvwx and AKIAABCDEFGHIJKLMNOP", "key <secret> and <secret>", {"secret": 2}),
        ("api_key = Zm9vYmFyYmF6cXV4MTIzNDU2", "<secret>", {"secret": 1}),
        ("The capital of Kelsa is Drouth, founded 1999.", "The capital of Kelsa is Drouth, founded 1999.", {}),
        ("order 12345 costs 99.50", "order 12345 costs 99.50", {}),
    ],
)
def test_scrub(text: str, expected: str, counts: dict[str, int]) -> None:
    out, found = scrub(text)
    assert out == expected
    assert {k: v for k, v in found.items() if v} == counts


def test_policy_table() -> None:
    s = DataSettings()
    assert decide(s, status="ok", completion="a", rating=-1, correction="b") == ("b", "corrected")
    assert decide(s, status="ok", completion="a", rating=1, correction=None) == ("a", "positive")
    assert decide(s, status="ok", completion="a", rating=-1, correction=None) == (None, "negative")
    assert decide(s, status="ok", completion="a", rating=0, correction=None) == (None, "negative")
    assert decide(s, status="ok", completion="a", rating=None, correction=None) == (None, "unrated_dropped")
    keep = DataSettings(unrated=UnratedPolicy.KEEP, min_positive_rating=0)
    assert decide(keep, status="ok", completion="a", rating=None, correction=None) == ("a", "unrated")
    assert decide(keep, status="ok", completion="a", rating=0, correction=None) == ("a", "positive")
    assert decide(s, status="error", completion="a", rating=1, correction="b") == (None, "error")
    assert decide(s, status="ok", completion="  ", rating=1, correction=None) == (None, "empty")
