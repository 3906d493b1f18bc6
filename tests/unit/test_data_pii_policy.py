from __future__ import annotations

import random

import pytest

from rayloop.config import DataSettings, UnratedPolicy
from rayloop.data.pii import _EMAIL, _sub_emails, scrub
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


# Scrubbing time is linear in the text's length: benchmarks/data/bench_pii.py measures it against prose (the
# former e-mail and secret patterns were quadratic on the adversarial texts there).


def test_email_scan_matches_the_reference_pattern() -> None:
    """The linear e-mail scan finds exactly what ``_EMAIL.sub`` finds, edge cases and random text alike."""
    cases = [
        "a@b.com.x@c.com",  # the second address starts where the first ended, inside a run
        "a@b.com-x@c.com",
        "..bob@x.com",  # the match starts at the first word boundary of the run
        "éab.c@x.com",  # ... which a non-ASCII word character before the run moves
        "_.a@b.cd",
        "%+a@bb.cc",
        "x@a.bc.de_",
        "a@b.cd@e.fg",
        "a@b.c@d.ef.gh",
        "me@x.io.you@y.io.z@w.io",
        "a." * 50 + "bob@example.com",
        "",
        "@",
    ]
    rng = random.Random(16)
    for alphabet in ("a.@-", "ab.@-_%+é1 ", "aZ9_.-%+@ é\u0663x", "a.@com", "ab@.c-_"):
        cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25))) for _ in range(2000)]
    pieces = ["bob", "@", ".", "com", "-", "_", "%", "+", "é", " ", "x", "1", "@b.com", ".x@c.com", "ü", ".."]
    cases += ["".join(rng.choices(pieces, k=rng.randint(1, 10))) for _ in range(5000)]
    assert sum(bool(_EMAIL.search(c)) for c in cases) > 1000  # the random text holds addresses
    for c in cases:
        assert _sub_emails(c, "<email>") == _EMAIL.subn("<email>", c), c


def test_scrub_finds_pii_after_adversarial_text() -> None:
    text = "a." * 5000 + " bob@example.com " + "token" + " " * 5000 + "= Zm9vYmFyYmF6cXV4MTIzNDU2 +1 (555) 123-4567"
    out, found = scrub(text)
    assert out == "a." * 5000 + " <email> <secret> <phone>"
    assert found == {"email": 1, "phone": 1, "secret": 1}


def test_an_answer_with_several_choices_is_not_trained_on_unless_corrected() -> None:
    s = DataSettings()
    assert decide(s, status="ok", completion="a", rating=1, correction=None, n_choices=2) == (None, "multi_choice")
    assert decide(s, status="ok", completion="a", rating=1, correction="the fix", n_choices=3) == (
        "the fix",
        "corrected",
    )
    assert decide(s, status="ok", completion="a", rating=1, correction=None) == ("a", "positive")


def test_each_choice_of_a_response_body_in_index_order() -> None:
    from rayloop.serving.server import body_choices

    chat = {"choices": [{"index": 1, "message": {"content": "B"}}, {"index": 0, "message": {"content": "A"}}]}
    assert body_choices(chat) == ["A", "B"]
    assert body_choices({"choices": [{"index": 0, "text": "x"}, {"index": 1, "text": "y"}]}) == ["x", "y"]
    assert body_choices({"error": {"message": "no"}}) == [] and body_choices(None) == []
