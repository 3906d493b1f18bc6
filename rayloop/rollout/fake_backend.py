"""A :class:`~rayloop.rollout.backend.Backend` without Ray, for fast unit tests of the controller.

State changes are instant. Traffic is simulated from the route table that was
in force: ``rps`` requests per second split by ``canary_percent``, each version
with its own error rate, latency and feedback rating (:class:`Behaviour`).
Pass it to :func:`~rayloop.rollout.controller.deploy` with ``backend=``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rayloop.rollout.analysis import SlotWindow
from rayloop.rollout.backend import AppState
from rayloop.serving.app import slot_deployment_name
from rayloop.serving.protocol import ModelConfig
from rayloop.serving.routing import CANARY, SHADOW, STABLE


@dataclass
class Behaviour:
    """How one version behaves in the simulation."""

    error_rate: float = 0.0
    latency_ms: float = 20.0
    rating: int = 1
    shadow_agreement: float = 1.0


class FakeBackend:
    """In-memory Serve app; ``applied`` lists every state asked for, in order."""

    def __init__(
        self,
        app_name: str = "fake",
        *,
        state: AppState | None = None,
        rps: float = 400.0,
        behaviours: dict[int, Behaviour] | None = None,
        clock: Any = time.time,
    ) -> None:
        self.app_name = app_name
        self.state = state
        self.rps = rps
        self.behaviours = behaviours or {}
        self.clock = clock
        self.applied: list[AppState] = []
        self.golden: list[int] = []
        self.golden_error: Exception | None = None  # ensure_golden raises it (no room for the recording engine)
        self.smoke_problems: list[str] = []
        self.fail_apply_when: Any = None  # callable(AppState) -> bool: raise on apply
        self.window_errors = 0  # the next this many window() calls raise (a stats actor that is gone)
        self.stats_started = 0.0  # when the stats store started (set it later: a store that restarted, empty)
        self.unready_slots: set[str] = set()  # slots whose replicas cannot start (their node is gone): waits fail
        # slot -> the slot whose engines hold the room its lost replicas need: it runs short (a wait for it whole
        # fails) until a state without that slot is applied.
        self.short_slots: dict[str, str] = {}
        # Slots whose engines are slow to stop once released: a wait for them idle fails, unless it lets them go.
        self.stopping_slots: set[str] = set()
        # Actor name -> state of replicas that have no node (a lost node's, with no room for them elsewhere).
        self.unplaced_replicas: dict[str, str] = {}
        self._timeline: list[tuple[float, AppState]] = []
        self._lock = threading.Lock()

    def behaviour(self, version: int | None) -> Behaviour:
        return self.behaviours.get(version or 0, Behaviour())

    def read(self) -> AppState | None:
        return self.state

    def apply(self, state: AppState) -> None:
        if self.fail_apply_when is not None and self.fail_apply_when(state):
            raise RuntimeError("simulated Serve failure")
        with self._lock:
            self.state = state
            self.applied.append(state)
            self.short_slots = {s: by for s, by in self.short_slots.items() if state.slots.get(by) is not None}
            self._timeline.append((self.clock(), state))

    def select(self, model: str) -> None:
        pass  # one app

    def wait(
        self,
        state: AppState,
        timeout_s: float,
        *,
        check: Callable[[], None] | None = None,
        progress: Callable[[str], None] | None = None,
        released: frozenset[str] = frozenset(),
        whole: bool = True,
    ) -> None:
        from rayloop.errors import RolloutError

        if check is not None:
            check()
        if progress is not None:
            progress(f"{self.app_name}: {state.summary()}")
        assert self.state == state
        stuck = sorted(s for s in self.unready_slots if s not in released and state.slots.get(s) is not None)
        if stuck:
            raise RolloutError(f"slot {stuck[0]} did not become ready within {timeout_s:.0f}s (simulated)")
        short = sorted(s for s in self.short_slots if s not in released and state.slots.get(s) is not None)
        stopping = sorted(s for s in self.stopping_slots if s not in released and state.slots.get(s) is None)
        if stopping:
            raise RolloutError(f"slot {stopping[0]} did not stop within {timeout_s:.0f}s (simulated)")
        if whole and short:
            raise RolloutError(f"slot {short[0]} is short of replicas after {timeout_s:.0f}s (simulated)")

    def ensure_golden(self, cfg: ModelConfig) -> None:
        if self.golden_error is not None:
            raise self.golden_error
        self.golden.append(cfg.version)

    def smoke(self, slot: str) -> list[str]:
        return list(self.smoke_problems)

    def _segments(self, since: float, until: float) -> list[tuple[float, AppState]]:
        """(seconds, state) pieces of the timeline inside ``[since, until)``."""
        out = []
        tl = self._timeline
        for i, (t, st) in enumerate(tl):
            end = tl[i + 1][0] if i + 1 < len(tl) else until
            lo, hi = max(t, since), min(end, until)
            if hi > lo:
                out.append((hi - lo, st))
        return out

    def stats_since(self) -> float:
        return self.stats_started

    def unplaced(self, slots: frozenset[str]) -> dict[str, str]:
        # (names as Serve's: SERVE_REPLICA::<app>#<deployment>#<id>)
        wanted = {f"#{slot_deployment_name(slot)}#" for slot in slots}
        return {n: s for n, s in self.unplaced_replicas.items() if any(w in n for w in wanted)}

    def window(self, since: float, until: float | None = None) -> dict[str, SlotWindow]:
        if self.window_errors > 0:
            self.window_errors -= 1
            raise ConnectionError("stats actor unreachable")
        end = self.clock() if until is None else until
        out: dict[str, SlotWindow] = {}
        with self._lock:
            segments = self._segments(since, end)
        for seconds, st in segments:
            n = int(seconds * self.rps)
            pct = st.table.canary_percent if st.slots.get(CANARY) is not None else 0.0
            shares = {CANARY: round(n * pct / 100.0), STABLE: n - round(n * pct / 100.0)}
            for slot, k in shares.items():
                version = st.version(slot)
                if k <= 0 or version is None:
                    continue
                b = self.behaviour(version)
                errors = round(k * b.error_rate)
                w = SlotWindow(
                    requests=k,
                    errors=errors,
                    latencies_ms=[b.latency_ms] * (k - errors),
                    ratings=[b.rating] * (k // 4),
                    versions=[version],
                )
                out[slot] = out[slot].merged(w) if slot in out else w
        return out

    def shadow_window(self, since: float, until: float | None = None) -> dict[str, Any]:
        end = self.clock() if until is None else until
        pairs = 0
        versions: set[int] = set()
        agreement = 1.0
        with self._lock:
            segments = self._segments(since, end)
        for seconds, st in segments:
            v = st.version(SHADOW)
            if v is None:
                continue
            pairs += int(seconds * self.rps * st.table.shadow_percent / 100.0)
            versions.add(v)
            agreement = self.behaviour(v).shadow_agreement
        return {
            "pairs": pairs,
            "errors": 0,
            "exact_match_rate": agreement if pairs else None,
            "mean_similarity": agreement if pairs else None,
            "latency_delta_ms_p50": 0.0 if pairs else None,
            "shadow_versions": sorted(versions),
        }
