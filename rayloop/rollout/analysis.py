"""Canary analysis: compare the canary slot with stable over a window, against thresholds.

Three checks, each with its thresholds in :class:`~rayloop.config.RolloutSettings`:

- **errors**: canary error rate minus stable's must not exceed ``max_error_rate_delta``;
- **latency**: canary p95 must not exceed ``max_p95_latency_ratio`` x stable's
  *and* stable's plus ``latency_slack_ms`` (tiny CPU latencies jitter by tens of ms);
- **feedback**: canary mean rating minus stable's must be at least ``min_feedback_delta``.

A check with too few samples is skipped (and says so). The verdict is
``fail`` as soon as one check fails on enough data (the controller rolls back at
once, even mid-step), ``pass`` when the canary has enough requests and nothing
failed, else ``inconclusive``.

    >>> from rayloop.config import RolloutSettings
from rayloop.serving.stats import SlotWindow, percentile

__all__ = ["FAIL", "INCONCLUSIVE", "PASS", "Decision", "SlotWindow", "Verdict", "judge", "percentile"]
    >>> ok = SlotWindow(requests=100, latencies_ms=[10.0] * 100, ratings=[1] * 20)
    >>> judge(ok, ok, RolloutSettings()).decision
    'pass'
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rayloop.config import RolloutSettings
from rayloop.serving.stats import SlotWindow, percentile

__all__ = ["FAIL", "INCONCLUSIVE", "PASS", "Decision", "SlotWindow", "Verdict", "judge", "percentile"]

Decision = Literal["pass", "fail", "inconclusive"]
PASS: Decision = "pass"
FAIL: Decision = "fail"
INCONCLUSIVE: Decision = "inconclusive"


class Verdict(BaseModel):
    """Outcome of one judgement."""

    model_config = ConfigDict(extra="forbid")

    decision: Decision = Field(description="pass, fail or inconclusive.")
    reasons: list[str] = Field(default_factory=list, description="Why: failed checks first, then skipped ones.")
    canary: dict[str, Any] = Field(default_factory=dict, description="Canary numbers.")
    stable: dict[str, Any] = Field(default_factory=dict, description="Stable (baseline) numbers.")


def judge(canary: SlotWindow, stable: SlotWindow, t: RolloutSettings, *, latency: bool = True) -> Verdict:
    """Compare ``canary`` with ``stable`` (the baseline) under the thresholds in ``t``.

    ``latency=False`` skips the latency check (mid-step: queues right after a
    traffic shift inflate p95 for a moment; latency is judged at the step's end).
    """
    failed: list[str] = []
    notes: list[str] = []
    enough = canary.requests >= t.min_samples

    if enough and stable.requests >= t.min_samples:
        delta = canary.error_rate - stable.error_rate
        if delta > t.max_error_rate_delta:
            failed.append(
                f"error rate {canary.error_rate:.1%} on canary vs {stable.error_rate:.1%} on stable "
                f"(+{delta:.1%} > +{t.max_error_rate_delta:.1%} allowed)"
            )
    elif enough and canary.error_rate > t.max_error_rate_delta:
        # No baseline to compare with: stable is taken as error free.
        failed.append(
            f"error rate {canary.error_rate:.1%} on canary with no stable baseline "
            f"(> {t.max_error_rate_delta:.1%} allowed)"
        )
    elif not enough:
        notes.append(f"errors: {canary.requests} canary requests < {t.min_samples} needed")

    cp, sp = canary.p95_ms, stable.p95_ms
    if not latency:
        notes.append("latency: judged at the end of the step")
    elif enough and cp is not None and sp is not None and len(stable.latencies_ms) >= t.min_samples:
        limit = max(sp * t.max_p95_latency_ratio, sp + t.latency_slack_ms)
        if cp > limit:
            failed.append(
                f"p95 latency {cp:.0f} ms on canary vs {sp:.0f} ms on stable "
                f"(> {limit:.0f} ms = max({t.max_p95_latency_ratio}x, +{t.latency_slack_ms:.0f} ms))"
            )
    else:
        notes.append("latency: not enough samples")

    cm, sm = canary.mean_rating, stable.mean_rating
    if cm is not None and sm is not None and min(len(canary.ratings), len(stable.ratings)) >= t.min_ratings_per_step:
        fd = cm - sm
        if fd < t.min_feedback_delta:
            failed.append(
                f"mean rating {cm:+.2f} on canary vs {sm:+.2f} on stable ({fd:+.2f} < {t.min_feedback_delta:+.2f} allowed)"
            )
    else:
        notes.append(
            f"feedback: {len(canary.ratings)} canary / {len(stable.ratings)} stable ratings "
            f"(< {t.min_ratings_per_step} needed)"
        )

    decision = FAIL if failed else (PASS if enough else INCONCLUSIVE)
    return Verdict(decision=decision, reasons=failed + notes, canary=canary.summary(), stable=stable.summary())
