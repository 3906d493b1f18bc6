"""Live per-slot metrics of a serving app, for the rollout controller and ``rayloop status``.

While a rollout judges live traffic (``RouteTable.observe``), the ingress replicas send what they saw (one observation per answered request,
one rating per feedback, one pair summary per shadow copy) in batches to one
detached actor per app (:class:`RouterStats`); the controller asks it for a
time window. Feedback is joined to requests by request id here, so a rating
counts for the slot and window of the request it rates, whichever stable
replica received it.

Sending never blocks a request: :class:`StatsClient` buffers in memory (bounded)
and ships from a background task; a missing actor only loses samples.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import hashlib
import logging
import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rayloop.config import Settings

logger = logging.getLogger("ray.serve")

NAMESPACE = "rayloop"
MAX_RECORDS = 500_000
MAX_RATINGS = 500_000
# Batches from several stable replicas interleave; look this far back before `since`.
REORDER_S = 30.0

# (ts, request_id, slot, version, ok, latency_ms)
Observation = tuple[float, str, str, int, bool, float]
# (ts, request_id, primary_version, shadow_version, ok, latency_ms, primary_latency_ms, exact, similarity)
ShadowPair = tuple[float, str, int, int, bool, float, float, bool, float]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(s)))
    return s[rank - 1]


class SlotWindow(BaseModel):
    """What one slot did over a window (built by the stats actor from ingress observations)."""

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(default=0, ge=0, description="Answered requests.")
    errors: int = Field(default=0, ge=0, description="Requests that ended in an error.")
    latencies_ms: list[float] = Field(default_factory=list, description="Latency samples (ok requests).")
    ratings: list[int] = Field(default_factory=list, description="Feedback ratings joined by request id.")
    versions: list[int] = Field(default_factory=list, description="Versions that answered.")

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p95_ms(self) -> float | None:
        return percentile(self.latencies_ms, 95)

    @property
    def mean_rating(self) -> float | None:
        return sum(self.ratings) / len(self.ratings) if self.ratings else None

    def merged(self, other: SlotWindow) -> SlotWindow:
        return SlotWindow(
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            latencies_ms=self.latencies_ms + other.latencies_ms,
            ratings=self.ratings + other.ratings,
            versions=sorted(set(self.versions) | set(other.versions)),
        )

    def summary(self) -> dict[str, Any]:
        """JSON-friendly numbers for events and status (no raw samples)."""
        p95 = self.p95_ms
        mean = self.mean_rating
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "p50_ms": None if not self.latencies_ms else round(percentile(self.latencies_ms, 50) or 0.0, 2),
            "p95_ms": None if p95 is None else round(p95, 2),
            "ratings": len(self.ratings),
            "mean_rating": None if mean is None else round(mean, 4),
            "versions": self.versions,
        }


def stats_actor_name(app_name: str, storage_root: str) -> str:
    return f"rayloop-router-stats-{app_name}-" + hashlib.sha256(storage_root.encode()).hexdigest()[:8]


class RouterStats:
    """In-memory, bounded store of ingress observations (a detached Ray actor)."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self._max = max_records
        self._ts: list[float] = []
        self._obs: list[Observation] = []
        self._ratings: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._shadow_ts: list[float] = []
        self._shadow: list[ShadowPair] = []
        self._totals: collections.Counter[str] = collections.Counter()
        self._started = time.time()

    def observe(self, rows: list[Observation]) -> None:
        for r in rows:
            self._ts.append(r[0])
            self._obs.append(r)
            self._totals[r[2]] += 1
        if len(self._obs) > self._max:
            cut = len(self._obs) - self._max // 2
            del self._ts[:cut], self._obs[:cut]

    def rate(self, items: list[tuple[str, int]]) -> None:
        for rid, rating in items:
            self._ratings[rid] = int(rating)
            self._ratings.move_to_end(rid)
        while len(self._ratings) > MAX_RATINGS:
            self._ratings.popitem(last=False)

    def shadow(self, rows: list[ShadowPair]) -> None:
        for r in rows:
            self._shadow_ts.append(r[0])
            self._shadow.append(r)
        if len(self._shadow) > self._max:
            cut = len(self._shadow) - self._max // 2
            del self._shadow_ts[:cut], self._shadow[:cut]

    def window(self, since: float, until: float | None = None) -> dict[str, dict[str, Any]]:
        """slot -> :class:`SlotWindow` (as a dict) for requests answered in ``[since, until)``."""
        end = float("inf") if until is None else until
        out: dict[str, SlotWindow] = {}
        start = bisect.bisect_left(self._ts, since - REORDER_S)
        for ts, rid, slot, version, ok, latency in self._obs[start:]:
            if not since <= ts < end:
                continue
            w = out.setdefault(slot, SlotWindow())
            w.requests += 1
            if ok:
                w.latencies_ms.append(latency)
            else:
                w.errors += 1
            if version not in w.versions:
                w.versions.append(version)
            rating = self._ratings.get(rid)
            if rating is not None:
                w.ratings.append(rating)
        return {k: v.model_dump() for k, v in out.items()}

    def shadow_window(self, since: float, until: float | None = None) -> dict[str, Any]:
        """Summary of shadow pairs in ``[since, until)``: agreement, latency deltas, errors."""
        end = float("inf") if until is None else until
        start = bisect.bisect_left(self._shadow_ts, since - REORDER_S)
        rows = [r for r in self._shadow[start:] if since <= r[0] < end]
        ok = [r for r in rows if r[4]]
        deltas = sorted(r[5] - r[6] for r in ok)
        return {
            "pairs": len(rows),
            "errors": len(rows) - len(ok),
            "exact_match_rate": round(sum(r[7] for r in ok) / len(ok), 4) if ok else None,
            "mean_similarity": round(sum(r[8] for r in ok) / len(ok), 4) if ok else None,
            "latency_delta_ms_p50": round(deltas[len(deltas) // 2], 2) if deltas else None,
            "shadow_versions": sorted({r[3] for r in rows}),
        }

    def totals(self) -> dict[str, int]:
        """Observations per slot since the actor started."""
        return dict(self._totals)

    def ping(self) -> bool:
        return True

    def started_at(self) -> float:
        """When this actor started: it holds nothing observed before (a killed actor comes back empty)."""
        return self._started


def get_stats_actor(app_name: str, settings: Settings, *, create: bool = True) -> Any:
    """The app's stats actor (created on first use, detached so a replica restart keeps the history)."""
    import ray

    name = stats_actor_name(app_name, settings.storage_root)
    if not create:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
    from rayloop.raysession import on_the_head

    return (
        ray.remote(RouterStats)
        .options(
            **on_the_head(),
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            # Its node's death (the head's, brought back with its state) restarts it there, empty: what it
            # held is lost, and its started_at tells a rollout that it judges only what came after.
            max_restarts=-1,
        )
        .remote()
    )


class StatsClient:
    """What a stable replica holds: buffer locally, ship in the background, never block or raise."""

    def __init__(self, actor_factory: Any, *, flush_s: float = 0.25, max_buffer: int = 50_000) -> None:
        self._factory = actor_factory
        self._actor: Any = None
        self._flush_s = flush_s
        self._max = max_buffer
        self._obs: list[Observation] = []
        self._ratings: list[tuple[str, int]] = []
        self._shadow: list[ShadowPair] = []
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def _start(self) -> None:
        if self._task is None:
            try:
                self._task = asyncio.get_running_loop().create_task(self._run())
            except RuntimeError:
                pass  # no loop yet; the next call from a request starts it

    def _room(self) -> bool:
        if len(self._obs) + len(self._ratings) + len(self._shadow) >= self._max:
            self.dropped += 1
            return False
        return True

    def observe(self, slot: str, row: dict[str, Any]) -> None:
        if row.get("status") == "client_error":
            return  # a bad request or a client that left says nothing about the version that answered
        if self._room():
            ok = row.get("status") == "ok"
            self._obs.append(
                (time.time(), row["request_id"], slot, int(row["model_version"]), ok, float(row["latency_ms"] or 0.0))
            )
        self._start()

    def rate(self, request_id: str, rating: int) -> None:
        if self._room():
            self._ratings.append((request_id, rating))
        self._start()

    def shadow(self, pair: ShadowPair) -> None:
        if self._room():
            self._shadow.append(pair)
        self._start()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> None:
        obs, ratings, shadow = self._obs, self._ratings, self._shadow
        if not (obs or ratings or shadow):
            return
        self._obs, self._ratings, self._shadow = [], [], []
        try:
            if self._actor is None:
                self._actor = self._factory()
            calls = []
            if obs:
                calls.append(self._actor.observe.remote(obs))
            if ratings:
                calls.append(self._actor.rate.remote(ratings))
            if shadow:
                calls.append(self._actor.shadow.remote(shadow))
            await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
        except Exception as e:  # the actor died or is slow: lose these samples, find it again next time
            self.dropped += len(obs) + len(ratings) + len(shadow)
            self._actor = None
            logger.warning("rollout stats: %d samples dropped (%s)", len(obs) + len(ratings) + len(shadow), e)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush()
