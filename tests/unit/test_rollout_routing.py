"""Routing and canary analysis: pure logic, exact and deterministic."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from rayloop.config import RolloutSettings
from rayloop.rollout.analysis import FAIL, INCONCLUSIVE, PASS, SlotWindow, judge, percentile
from rayloop.serving.routing import CANARY, STABLE, Picker, RouteTable, bucket, session_key

SESSIONS = [f"session-{i}" for i in range(2000)]


def _share(table: RouteTable, keys: list[str | None], seed: int = 0) -> float:
    p = Picker(table, random.Random(seed))
    return 100.0 * sum(p.pick(k) == CANARY for k in keys) / len(keys)


@pytest.mark.parametrize("pct", [5, 25, 50, 75])
def test_sticky_share_within_five_points_over_2000_sessions(pct: int) -> None:
    assert abs(_share(RouteTable(canary_percent=pct, salt="r1"), list(SESSIONS)) - pct) <= 5


@pytest.mark.parametrize("pct", [5, 25, 50])
def test_share_without_sessions_within_five_points(pct: int) -> None:
    assert abs(_share(RouteTable(canary_percent=pct), [None] * 2000, seed=pct) - pct) <= 5


def test_edges_route_everything() -> None:
    assert _share(RouteTable(canary_percent=0, salt="x"), list(SESSIONS)) == 0
    assert _share(RouteTable(canary_percent=100, salt="x"), list(SESSIONS)) == 100


def test_raising_the_percentage_only_moves_sessions_stable_to_canary() -> None:
    steps = [5, 25, 50, 100]
    seen: dict[str, list[str]] = {s: [] for s in SESSIONS}
    for pct in steps:
        p = Picker(RouteTable(canary_percent=pct, salt="rollout-9"))
        for s in SESSIONS:
            # Many requests of one session at one step: always the same slot.
            picks = {p.pick(s) for _ in range(3)}
            assert len(picks) == 1
            seen[s].append(picks.pop())
    for s, path in seen.items():
        first_canary = path.index(CANARY)
        assert path[:first_canary] == [STABLE] * first_canary and set(path[first_canary:]) == {CANARY}, s


def test_salt_reshuffles_sessions_between_rollouts() -> None:
    a = {s for s in SESSIONS if Picker(RouteTable(canary_percent=50, salt="r1")).pick(s) == CANARY}
    b = {s for s in SESSIONS if Picker(RouteTable(canary_percent=50, salt="r2")).pick(s) == CANARY}
    assert a != b and abs(len(a) - len(b)) < 200


def test_bucket_is_deterministic_and_in_range() -> None:
    assert bucket("k", "s") == bucket("k", "s")
    values = [bucket(s, "salt") for s in SESSIONS]
    assert all(0 <= v < 100 for v in values)
    assert abs(sum(values) / len(values) - 50) < 3


def test_session_key_precedence() -> None:
    assert (
        session_key({"x-rayloop-session-id": "a", "x-rayloop-user-id": "u"}, {"user": "b"}) == "x-rayloop-session-id:a"
    )
    assert session_key({"x-rayloop-session": "a"}, {}) == "x-rayloop-session:a"
    assert session_key({"x-rayloop-user-id": "u"}, {"user": "b"}) == "x-rayloop-user-id:u"
    assert session_key({}, {"user": "b"}) == "user:b"
    assert session_key({}, {"user": 7}) is None
    assert session_key({}, {}) is None


def test_not_sticky_ignores_the_session() -> None:
    p = Picker(RouteTable(canary_percent=50, sticky=False), random.Random(1))
    assert len({p.pick("same") for _ in range(50)}) == 2


def test_shadow_sampling_share_and_determinism() -> None:
    p = Picker(RouteTable(shadow_percent=20, salt="r"))
    ids = [f"req-{i}" for i in range(2000)]
    share = 100.0 * sum(p.mirror(i) for i in ids) / len(ids)
    assert abs(share - 20) <= 5
    assert [p.mirror(i) for i in ids[:50]] == [p.mirror(i) for i in ids[:50]]
    assert not Picker(RouteTable()).mirror("x") and Picker(RouteTable(shadow_percent=100)).mirror("x")


def test_route_table_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="canary_percent"):
        RouteTable(canary_percent=101)
    with pytest.raises(ValidationError, match="shadow_percent"):
        RouteTable(shadow_percent=-1)
    with pytest.raises(ValidationError, match="extra"):
        RouteTable.model_validate({"weights": {}})


# -- analysis --------------------------------------------------------------------
T = RolloutSettings(min_requests_per_step=20, min_ratings_per_step=10)


def _w(n: int, errors: int = 0, latency: float = 20.0, ratings: list[int] | None = None) -> SlotWindow:
    return SlotWindow(requests=n, errors=errors, latencies_ms=[latency] * (n - errors), ratings=ratings or [])


def test_percentile_nearest_rank() -> None:
    assert percentile([], 95) is None
    assert percentile(list(map(float, range(1, 101))), 95) == 95.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_healthy_canary_passes() -> None:
    v = judge(_w(50, ratings=[1] * 10), _w(500, ratings=[1] * 30), T)
    assert v.decision == PASS and v.canary["requests"] == 50 and v.stable["mean_rating"] == 1.0


def test_too_few_canary_requests_is_inconclusive() -> None:
    v = judge(_w(19), _w(500), T)
    assert v.decision == INCONCLUSIVE
    assert "19 canary requests < 20 needed" in v.reasons[0]


def test_error_rate_breach_fails_with_numbers() -> None:
    v = judge(_w(100, errors=5), _w(1000, errors=10), T)
    assert v.decision == FAIL
    assert v.reasons[0] == "error rate 5.0% on canary vs 1.0% on stable (+4.0% > +2.0% allowed)"
    assert judge(_w(100, errors=2), _w(1000, errors=10), T).decision == PASS


def test_errors_without_stable_baseline() -> None:
    assert judge(_w(100, errors=10), SlotWindow(), T).decision == FAIL
    assert judge(_w(100), SlotWindow(), T).decision == PASS


def test_latency_needs_ratio_and_slack() -> None:
    # 2x slower but only +20 ms: jitter on a tiny model, not a breach.
    assert judge(_w(100, latency=40.0), _w(100, latency=20.0), T).decision == PASS
    v = judge(_w(100, latency=400.0), _w(100, latency=100.0), T)
    assert v.decision == FAIL and v.reasons[0].startswith("p95 latency 400 ms on canary vs 100 ms on stable")


def test_worse_feedback_fails_only_with_enough_ratings() -> None:
    bad, good = [-1] * 10, [1] * 10
    v = judge(_w(50, ratings=bad), _w(50, ratings=good), T)
    assert (
        v.decision == FAIL and "mean rating -1.00 on canary vs +1.00 on stable (-2.00 < -0.10 allowed)" in v.reasons[0]
    )
    assert judge(_w(50, ratings=bad[:9]), _w(50, ratings=good), T).decision == PASS
    # Slightly worse but within the allowed delta.
    assert judge(_w(50, ratings=[1] * 19 + [0]), _w(50, ratings=[1] * 20), T).decision == PASS


def test_fail_is_reported_even_while_inconclusive_on_requests() -> None:
    v = judge(_w(5, ratings=[-1] * 10), _w(50, ratings=[1] * 10), T)
    assert v.decision == FAIL


def test_merged_windows_add_up() -> None:
    m = _w(10, errors=1, ratings=[1]).merged(_w(5, ratings=[-1]))
    assert (m.requests, m.errors, len(m.latencies_ms), m.mean_rating) == (15, 1, 14, 0.0)


def test_session_buckets_need_the_secret_key(tmp_path: Path) -> None:
    from rayloop.serving.routing import SECRET_KEY, routing_secret
    from rayloop.storage import Storage

    storage = Storage(str(tmp_path))
    key = routing_secret(storage)
    assert len(key) == 64 and routing_secret(storage) == key and storage.exists(SECRET_KEY)
    # A client that knows the (public) salt and its own session id still cannot tell its bucket.
    table = RouteTable(canary_percent=50, salt="rollout-7")
    with_key = [Picker(table, secret=key).pick(s) for s in SESSIONS]
    without = [Picker(table).pick(s) for s in SESSIONS]
    assert with_key != without
    assert sum(a == b for a, b in zip(with_key, without, strict=True)) < 0.6 * len(SESSIONS)
    # ... and the key is nowhere in the table a Serve config carries.
    assert key.decode() not in table.model_dump_json()
