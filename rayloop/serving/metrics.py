"""Serving metrics through ``ray.util.metrics`` (Ray dashboard and Ray's Prometheus endpoint).

Ray exports them with a ``ray_`` prefix, e.g. ``ray_rayloop_requests_total``.
Every series carries the model name and version that answered.

=================================  =========  ===========================================
name                               kind       tags
=================================  =========  ===========================================
rayloop_requests_total             counter    model, version, slot, endpoint, status
rayloop_request_latency_ms         histogram  model, version, slot, endpoint
rayloop_ttft_ms                    histogram  model, version, slot, endpoint
rayloop_generated_tokens_total     counter    model, version, slot
rayloop_in_flight_requests         gauge      model, version, slot
rayloop_feedback_total             counter    model, version, rating
rayloop_capture_dropped_total      counter    table
rayloop_weight_swaps_total         counter    model, version, mode, outcome
=================================  =========  ===========================================
"""

from __future__ import annotations

import collections
import threading
from typing import Any

# Seconds between re-reports of the gauges (Ray's default export interval is 10 s).
GAUGE_REFRESH_S = 5.0
LATENCY_BOUNDARIES_MS = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0]


class ServingMetrics:
    """Created once per replica process (metric objects are cheap handles)."""

    def __init__(self) -> None:
        from ray.util import metrics as m

        self.requests = m.Counter(
            "rayloop_requests_total",
            "Requests by HTTP status.",
            tag_keys=("model", "version", "slot", "endpoint", "status"),
        )
        self.latency = m.Histogram(
            "rayloop_request_latency_ms",
            "End-to-end latency at the ingress.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("model", "version", "slot", "endpoint"),
        )
        self.ttft = m.Histogram(
            "rayloop_ttft_ms",
            "Time to first token in the engine replica.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("model", "version", "slot", "endpoint"),
        )
        self.tokens = m.Counter(
            "rayloop_generated_tokens_total", "Completion tokens.", tag_keys=("model", "version", "slot")
        )
        self.in_flight = m.Gauge(
            "rayloop_in_flight_requests", "Requests being answered.", tag_keys=("model", "version", "slot")
        )
        self.feedback = m.Counter(
            "rayloop_feedback_total", "Feedback received.", tag_keys=("model", "version", "rating")
        )
        self.dropped = m.Counter(
            "rayloop_capture_dropped_total",
            "Capture rows dropped (full buffer or writer failure).",
            tag_keys=("table",),
        )
        self.swaps = m.Counter(
            "rayloop_weight_swaps_total",
            "Version changes of engine replicas.",
            tag_keys=("model", "version", "mode", "outcome"),
        )
        self._in_flight: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def inc_in_flight(self, tags: dict[str, str], delta: int) -> None:
        key = (tags["model"], tags["version"], tags["slot"])
        with self._lock:
            self._in_flight[key] += delta
            self._set_in_flight(key)
            if self._refresher is None:
                self._start_refresher()

    def _set_in_flight(self, key: tuple[str, str, str]) -> None:
        self.in_flight.set(self._in_flight[key], tags=dict(zip(("model", "version", "slot"), key, strict=True)))

    def refresh_gauges(self) -> None:
        """Report every in-flight gauge again: Ray drops a gauge series not refreshed within two
        export intervals, so an idle replica's 0 would otherwise vanish from Prometheus."""
        with self._lock:
            for key in list(self._in_flight):
                self._set_in_flight(key)

    def _start_refresher(self) -> None:
        def loop() -> None:
            while not self._stop.wait(GAUGE_REFRESH_S):
                try:
                    self.refresh_gauges()
                except Exception:  # metrics must never take the replica down
                    pass

        self._refresher = threading.Thread(target=loop, name="rayloop-gauge-refresh", daemon=True)
        self._refresher.start()

    def observe_request(
        self, tags: dict[str, str], endpoint: str, status: int, latency_ms: float, ttft_ms: float | None, tokens: int
    ) -> None:
        t: dict[str, Any] = {**tags, "endpoint": endpoint}
        self.requests.inc(1, tags={**t, "status": str(status)})
        self.latency.observe(latency_ms, tags=t)
        if ttft_ms is not None:
            self.ttft.observe(ttft_ms, tags=t)
        if tokens:
            self.tokens.inc(tokens, tags=tags)
