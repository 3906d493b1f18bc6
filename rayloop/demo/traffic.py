"""Simulated users against a live rayloop endpoint: chat requests, then feedback.

Used by ``rayloop demo`` and the loop's integration tests. Each simulated user
asks a question through ``POST /v1/chat/completions``, reads the answer and
the ``x-rayloop-model-version`` header, and rates it through
``POST /v1/feedback`` (with a correction when the answer was wrong).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from rayloop.demo.world import UserRequest, UserSimulator, World

VERSION_HEADER = "x-rayloop-model-version"
REQUEST_ID_HEADER = "x-rayloop-request-id"


@dataclass
class TrafficStats:
    requests: int = 0
    failed: int = 0
    feedback_sent: int = 0
    feedback_failed: int = 0
    by_version: Counter[str] = field(default_factory=Counter)
    correct_by_version: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def to_json(self) -> dict[str, Any]:
        acc = {v: self.correct_by_version[v] / n for v, n in self.by_version.items() if n}
        return {
            "requests": self.requests,
            "failed_requests": self.failed,
            "feedback_sent": self.feedback_sent,
            "feedback_failed": self.feedback_failed,
            "by_version": dict(self.by_version),
            "live_accuracy_by_version": acc,
            "errors": self.errors[:5],
        }


class Traffic:
    """Sends simulated users' requests and feedback to ``base_url``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        sim: UserSimulator,
        *,
        poison: bool = False,
        api_key: str | None = None,
        concurrency: int = 4,
        feedback: bool = True,
        timeout_s: float = 60.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)
        self.model = model
        self.sim = sim
        self.poison = poison
        self.concurrency = concurrency
        self.feedback = feedback
        self.stats = TrafficStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pause_s = 0.0

    def one(self, req: UserRequest) -> None:
        headers = {"x-rayloop-session-id": req.user}
        try:
            r = self.client.post("/v1/chat/completions", json=req.body(self.model), headers=headers)
        except httpx.HTTPError as e:
            self._fail(f"{type(e).__name__}: {e}")
            return
        if r.status_code != 200:
            self._fail(f"HTTP {r.status_code}: {r.text[:200]}")
            return
        text = r.json()["choices"][0]["message"]["content"] or ""
        version = r.headers.get(VERSION_HEADER, "?")
        correct = World.is_correct(req.question, text)
        with self.stats._lock:
            self.stats.requests += 1
            self.stats.by_version[version] += 1
            self.stats.correct_by_version[version] += int(correct)
        if not self.feedback:
            return
        fb = {"request_id": r.headers[REQUEST_ID_HEADER], **self.sim.feedback(req, text, poison=self.poison)}
        try:
            f = self.client.post("/v1/feedback", json=fb)
            ok = f.status_code == 200
        except httpx.HTTPError:
            ok = False
        with self.stats._lock:
            self.stats.feedback_sent += int(ok)
            self.stats.feedback_failed += int(not ok)

    def _fail(self, msg: str) -> None:
        with self.stats._lock:
            self.stats.requests += 1
            self.stats.failed += 1
            if len(self.stats.errors) < 20:
                self.stats.errors.append(msg)

    def run(self, requests: Iterable[UserRequest]) -> TrafficStats:
        with ThreadPoolExecutor(self.concurrency) as pool:
            list(pool.map(self.one, requests))
        return self.stats

    # --- continuous load (during a rollout) -------------------------------
    def start(self, pause_s: float = 0.0) -> None:
        """Send rounds of ``concurrency`` requests until :meth:`stop`, ``pause_s`` apart (see :meth:`pace`)."""
        self.pause_s = pause_s

        def loop() -> None:
            with ThreadPoolExecutor(self.concurrency) as pool:
                while not self._stop.is_set():
                    batch = list(self.sim.requests(self.concurrency))
                    list(pool.map(self.one, batch))
                    if self.pause_s:
                        self._stop.wait(self.pause_s)

        self._thread = threading.Thread(target=loop, name="rayloop-traffic", daemon=True)
        self._thread.start()

    def pace(self, pause_s: float) -> None:
        """Change the pause between rounds of a running load (light while a new engine starts)."""
        self.pause_s = pause_s

    def stop(self) -> TrafficStats:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        return self.stats

    def close(self) -> None:
        self.client.close()


def simulate(
    base_url: str,
    model: str,
    *,
    repeats: int = 1,
    poison: bool = False,
    api_key: str | None = None,
    seed: int = 1,
) -> TrafficStats:
    """Simulated users of the demo world ask every new-fact question ``repeats`` times at ``base_url`` and
    rate the answers (wrong ones get -1 and the right answer as a correction; ``poison``: a wrong one)."""
    from rayloop.demo.world import UserSimulator, World

    sim = UserSimulator(World.build(), seed=seed)
    traffic = Traffic(base_url, model, sim, poison=poison, api_key=api_key)
    try:
        return traffic.run(sim.covering_requests(repeats=repeats))
    finally:
        traffic.client.close()
