"""Continuous client load for the rollout tests: the official openai client, sticky and fresh sessions."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

PROMPTS = ["What is the capital of Zorbia?", "Who rules Voubos?", "Tell me about Thusvun.", "Hello!"]


@dataclass
class Sample:
    sent: float
    done: float
    session: str
    sticky: bool
    status: int
    version: int | None
    request_id: str | None
    error: str | None = None


class Load:
    """``threads`` client threads sending chat completions until :meth:`stop`.

    ``sticky_threads`` of them cycle over ``fixed_sessions`` session ids (sticky
    checks); the others use a fresh session per request (share checks: one
    request = one session). ``rate(version)`` returns the feedback rating sent for
    an answer of that version (None: no feedback).
    """

    def __init__(
        self,
        url: str,
        *,
        threads: int = 6,
        sticky_threads: int = 2,
        fixed_sessions: int = 40,
        rate: Callable[[int], int | None] | None = None,
        max_tokens: int = 2,
    ) -> None:
        self.url = url
        self.threads = threads
        self.sticky_threads = sticky_threads
        self.fixed = [f"sticky-{i}" for i in range(fixed_sessions)]
        self.rate = rate
        self.max_tokens = max_tokens
        self.samples: list[Sample] = []
        self.feedback_failures: list[str] = []
        self.feedback_sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._cycle = itertools.cycle(self.fixed)
        self.active = threads

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i < self.sticky_threads, i), daemon=True)
            t.start()
            self._workers.append(t)

    def stop(self) -> list[Sample]:
        self._stop.set()
        for t in self._workers:
            t.join(120)
        return self.samples

    def resize(self, active: int) -> None:
        """Only the first ``active`` threads send (fewer while engines start: they share the CPU)."""
        self.active = active

    def _next_session(self, sticky: bool) -> str:
        if sticky:
            with self._lock:
                return next(self._cycle)
        return uuid.uuid4().hex

    def _run(self, sticky: bool, idx: int) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)
        fb = httpx.Client(timeout=60)
        n = 0
        while not self._stop.is_set():
            if idx >= self.active:
                time.sleep(0.05)
                continue
            session = self._next_session(sticky)
            n += 1
            t0 = time.time()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="demo",
                    messages=[{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
                    max_tokens=self.max_tokens,
                    temperature=0,
                    extra_headers={"x-rayloop-session-id": session},
                )
                raw.parse()
                version = int(raw.headers["x-rayloop-model-version"])
                rid = raw.headers["x-rayloop-request-id"]
                s = Sample(t0, time.time(), session, sticky, raw.status_code, version, rid)
            except Exception as e:
                s = Sample(
                    t0, time.time(), session, sticky, int(getattr(e, "status_code", 0) or 0), None, None, repr(e)[:300]
                )
            with self._lock:
                self.samples.append(s)
            if self.rate is not None and s.version is not None and s.request_id is not None:
                rating = self.rate(s.version)
                if rating is not None:
                    self.feedback_sent += 1
                    try:
                        r = fb.post(self.url + "/v1/feedback", json={"request_id": s.request_id, "rating": rating})
                        if r.status_code != 200:
                            self.feedback_failures.append(f"{r.status_code}: {r.text[:200]}")
                    except Exception as e:
                        self.feedback_failures.append(repr(e)[:200])
        fb.close()

    # -- checks ----------------------------------------------------------------
    def failures(self) -> list[Sample]:
        return [s for s in self.samples if s.status != 200 or s.version is None]

    def between(self, t0: float, t1: float, *, sticky: bool | None = None) -> list[Sample]:
        """Requests sent after ``t0`` and answered before ``t1``."""
        return [s for s in self.samples if s.sent >= t0 and s.done <= t1 and (sticky is None or s.sticky == sticky)]

    def rps(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        span = max(s.done for s in self.samples) - min(s.sent for s in self.samples)
        return len(self.samples) / span if span > 0 else 0.0

    def session_paths(self) -> dict[str, list[int]]:
        """Sticky session -> versions it got, in send order (repeats collapsed)."""
        out: dict[str, list[int]] = {}
        for s in sorted((s for s in self.samples if s.sticky and s.version is not None), key=lambda s: s.sent):
            path = out.setdefault(s.session, [])
            if not path or path[-1] != s.version:
                path.append(s.version)  # type: ignore[arg-type]
        return out


def timeline(record: dict[str, Any]) -> str:
    """``+12.3s step`` lines of a rollout record (printed by tests: where the time went)."""
    from datetime import datetime

    t0 = datetime.fromisoformat(record.history[0]["time"]).timestamp()
    lines = []
    for e in record.history:
        t = datetime.fromisoformat(e["time"]).timestamp() - t0
        extra = str(e.get("percent", e.get("reason", "")))
        c, st = e.get("canary"), e.get("stable")
        if isinstance(c, dict) and isinstance(st, dict):
            extra += f" (p95 canary {c.get('p95_ms')} ms / stable {st.get('p95_ms')} ms, {c.get('requests')} requests)"
        lines.append(f"  +{t:6.1f}s {e['event']} {extra}")
    return "\n".join(lines)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def active_phase(reg: Any, name: str = "demo") -> str | None:
    """The phase of ``name``'s active rollout (None: none is active)."""
    active = reg.active_rollout(name)
    return None if active is None else str(active.state.phase)
