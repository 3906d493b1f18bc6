"""Serving metrics through Ray's metrics (Ray dashboard and Ray's Prometheus endpoint).

Ray exports them with a ``ray_`` prefix, e.g. ``ray_rayloop_requests_total``. Names follow Prometheus
conventions: base units (seconds, ratios 0-1), ``_total`` on counters. In a Serve replica every series also
carries Serve's ``application``, ``deployment`` and ``replica`` labels. The version label is rayloop's: it
names the version that answered, also after an in-place swap (vLLM fixes its own ``model_name`` label when
the engine starts, so its metrics keep naming the first version a replica loaded; join them on
``ReplicaId`` with ``rayloop_engine_info`` to get the version).

=========================================  =========  =================================================
name                                       kind       labels (besides Serve's)
=========================================  =========  =================================================
rayloop_requests_total                     counter    model, version, slot, endpoint, code, status_class
rayloop_request_duration_seconds           histogram  model, version, slot, endpoint
rayloop_time_to_first_token_seconds        histogram  model, version, slot, endpoint
rayloop_time_per_output_token_seconds      histogram  model, version, slot, endpoint
rayloop_prompt_tokens_total                counter    model, version, slot
rayloop_generation_tokens_total            counter    model, version, slot
rayloop_requests_in_flight                 gauge      model, version, slot
rayloop_feedback_total                     counter    model, version, rating (-1, 0, 1; "none": a correction only)
rayloop_traffic_weight                     gauge      model, version, slot (share 0-1; shadow: mirrored)
rayloop_engine_info                        gauge      model, version, slot, ReplicaId (1 per engine)
rayloop_weight_swaps_total                 counter    model, version, mode, outcome
rayloop_weight_swap_duration_seconds       histogram  model, mode
rayloop_capture_dropped_total              counter    table (rows a replica could not hand over)
=========================================  =========  =================================================

``serving.metrics: false`` turns all of them off, and vLLM's engine statistics with them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayloop.serving.routing import RouteTable

# Seconds between re-reports of the gauges (Ray's default export interval is 10 s).
GAUGE_REFRESH_S = 5.0
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TOKEN_TIME_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
SWAP_BUCKETS_S = [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]

SLOT_TAGS = ("model", "version", "slot")
REQUEST_TAGS = (*SLOT_TAGS, "endpoint")


def status_class(code: int) -> str:
    """``200`` -> ``"2xx"``."""
    return f"{code // 100}xx"


def metrics_module() -> Any:
    """Serve's metric classes inside a replica (they add the replica's labels), else Ray's."""
    import importlib

    try:
        from ray.serve import context

        if context._get_internal_replica_context() is not None:  # type: ignore[no-untyped-call]
            return importlib.import_module("ray.serve.metrics")
    except Exception:
        pass
    return importlib.import_module("ray.util.metrics")


def replica_id() -> str:
    """This Serve replica's id (vLLM's ``ReplicaId`` label), or ``""`` outside Serve."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return ""


class ServingMetrics:
    """Created once per replica process (metric objects are cheap handles)."""

    def __init__(self) -> None:
        m = metrics_module()
        self.requests = m.Counter(
            "rayloop_requests_total",
            "Answered requests by HTTP status.",
            tag_keys=(*REQUEST_TAGS, "code", "status_class"),
        )
        self.duration = m.Histogram(
            "rayloop_request_duration_seconds",
            "End-to-end request time at the ingress, in seconds.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=REQUEST_TAGS,
        )
        self.ttft = m.Histogram(
            "rayloop_time_to_first_token_seconds",
            "Time to the first generated token, in seconds.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=REQUEST_TAGS,
        )
        self.tpot = m.Histogram(
            "rayloop_time_per_output_token_seconds",
            "Decode time per generated token after the first, in seconds.",
            boundaries=TOKEN_TIME_BUCKETS_S,
            tag_keys=REQUEST_TAGS,
        )
        self.prompt_tokens = m.Counter("rayloop_prompt_tokens_total", "Prompt tokens.", tag_keys=SLOT_TAGS)
        self.generation_tokens = m.Counter(
            "rayloop_generation_tokens_total", "Generated (completion) tokens.", tag_keys=SLOT_TAGS
        )
        self.in_flight = m.Gauge("rayloop_requests_in_flight", "Requests being answered.", tag_keys=SLOT_TAGS)
        # By rating value (Ray's histograms take positive bucket bounds only, and ratings go down to -1): the
        # mean rating is (count of +1 - count of -1) / count of rated feedback.
        self.feedback = m.Counter(
            "rayloop_feedback_total", "Feedback received, by rating.", tag_keys=("model", "version", "rating")
        )
        self.traffic = m.Gauge(
            "rayloop_traffic_weight",
            "Share (0-1) of the model's traffic routed to a slot; for shadow, the share of answers mirrored.",
            tag_keys=SLOT_TAGS,
        )
        self.engine_info = m.Gauge(
            "rayloop_engine_info",
            "1 for the version an engine replica serves now (join vLLM's metrics on ReplicaId).",
            tag_keys=(*SLOT_TAGS, "ReplicaId"),
        )
        self.dropped = m.Counter(
            "rayloop_capture_dropped_total",
            "Capture rows a replica dropped (full buffer or writer unreachable).",
            tag_keys=("table",),
        )
        self.swaps = m.Counter(
            "rayloop_weight_swaps_total",
            "Version changes of engine replicas by mode (fresh, in_place, rebuild) and outcome.",
            tag_keys=("model", "version", "mode", "outcome"),
        )
        self.swap_duration = m.Histogram(
            "rayloop_weight_swap_duration_seconds",
            "Time a replica took to change versions, in seconds.",
            boundaries=SWAP_BUCKETS_S,
            tag_keys=("model", "mode"),
        )
        # Gauges are re-reported every GAUGE_REFRESH_S: Ray drops a gauge series not reported within two
        # export intervals, so an idle replica's values would otherwise vanish from Prometheus.
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._handles = {"in_flight": self.in_flight, "traffic": self.traffic, "engine_info": self.engine_info}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    # -- gauges ------------------------------------------------------------------
    def _set(self, gauge: str, tags: dict[str, str], value: float, *, keep: bool = True) -> None:
        key = (gauge, tuple(sorted(tags.items())))
        with self._lock:
            self._handles[gauge].set(value, tags=tags)
            if keep:
                self._gauges[key] = value
            else:
                self._gauges.pop(key, None)
            if self._refresher is None:
                self._start_refresher()

    def _current(self, gauge: str) -> dict[tuple[tuple[str, str], ...], float]:
        with self._lock:
            return {tags: v for (g, tags), v in self._gauges.items() if g == gauge}

    def inc_in_flight(self, tags: dict[str, str], delta: int) -> None:
        key = ("in_flight", tuple(sorted(tags.items())))
        with self._lock:
            value = self._gauges.get(key, 0.0) + delta
            self._gauges[key] = value
            self.in_flight.set(value, tags=tags)
            if self._refresher is None:
                self._start_refresher()

    def set_engine(self, model: str, version: int, slot: str) -> None:
        """This replica's engine serves ``model@version`` now (the previous version's series goes to 0, then
        stops being reported)."""
        rid = replica_id()
        for tags in self._current("engine_info"):
            self._set("engine_info", dict(tags), 0.0, keep=False)
        self._set("engine_info", {"model": model, "version": str(version), "slot": slot, "ReplicaId": rid}, 1.0)

    def set_traffic(self, model: str, table: RouteTable, stable: int | None) -> None:
        """Traffic shares from the route table this replica applies (``stable``: its own engine's version)."""
        shares: dict[tuple[str, int], float] = {}
        canary = table.versions.get("canary")
        if canary is not None:
            shares[("canary", canary)] = table.canary_percent / 100.0
        if stable is not None:
            shares[("stable", stable)] = 1.0 - shares.get(("canary", canary or 0), 0.0)
        shadow = table.versions.get("shadow")
        if shadow is not None:
            shares[("shadow", shadow)] = table.shadow_percent / 100.0
        wanted = {
            tuple(sorted({"model": model, "version": str(v), "slot": s}.items())): share
            for (s, v), share in shares.items()
        }
        for tags in self._current("traffic"):
            if tags not in wanted:
                self._set("traffic", dict(tags), 0.0, keep=False)
        for tags, share in wanted.items():
            self._set("traffic", dict(tags), share)

    def refresh_gauges(self) -> None:
        """Report every kept gauge value again."""
        with self._lock:
            for (gauge, tags), value in self._gauges.items():
                self._handles[gauge].set(value, tags=dict(tags))

    def _start_refresher(self) -> None:
        def loop() -> None:
            while not self._stop.wait(GAUGE_REFRESH_S):
                try:
                    self.refresh_gauges()
                except Exception:  # metrics must never take the replica down
                    pass

        self._refresher = threading.Thread(target=loop, name="rayloop-gauge-refresh", daemon=True)
        self._refresher.start()

    # -- events ------------------------------------------------------------------
    def observe_request(
        self,
        tags: dict[str, str],
        endpoint: str,
        status: int,
        duration_s: float,
        ttft_s: float | None,
        prompt_tokens: int | None,
        generation_tokens: int,
    ) -> None:
        t: dict[str, Any] = {**tags, "endpoint": endpoint}
        self.requests.inc(1, tags={**t, "code": str(status), "status_class": status_class(status)})
        self.duration.observe(duration_s, tags=t)
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags=t)
            if generation_tokens > 1:
                self.tpot.observe(max(duration_s - ttft_s, 0.0) / (generation_tokens - 1), tags=t)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, tags=tags)
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens, tags=tags)

    def observe_feedback(self, model: str, version: int, rating: int | None) -> None:
        self.feedback.inc(
            1, tags={"model": model, "version": str(version), "rating": "none" if rating is None else str(rating)}
        )

    def observe_dropped(self, table: str, n: int) -> None:
        self.dropped.inc(n, tags={"table": table})

    def observe_swap(self, model: str, version: int, mode: str, outcome: str, seconds: float | None = None) -> None:
        self.swaps.inc(1, tags={"model": model, "version": str(version), "mode": mode, "outcome": outcome})
        if seconds is not None:
            self.swap_duration.observe(seconds, tags={"model": model, "mode": mode})


class NoMetrics:
    """What a replica uses with ``serving.metrics: false``: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return _noop


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def serving_metrics(enabled: bool) -> ServingMetrics | NoMetrics:
    return ServingMetrics() if enabled else NoMetrics()
