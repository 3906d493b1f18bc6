"""Canary: raise the new version's traffic share in steps, judging it against stable at each.

At each step (default 5, 25, 50, 100 %) the route table sends that share of
sessions to the canary slot, then :meth:`~rayloop.rollout.controller.Rollout.watch`
compares canary with stable over the step (error rate, p95 latency, feedback).
A breach rolls back at once (all traffic to stable, aliases back, reason
recorded); a step short of samples waits until its progress deadline
(``progress_deadline_s``, default ``max_step_wait_factor`` intervals), then is
*inconclusive*: it rolls back (or holds, ``rollout.inconclusive: hold``), a
step nobody judged is never passed. After the last step the new version is
promoted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rayloop.config import Strategy
from rayloop.serving.routing import CANARY

if TYPE_CHECKING:
    from rayloop.rollout.controller import Rollout


class Canary:
    kind: ClassVar[Strategy] = Strategy.CANARY

    def run(self, rollout: Rollout) -> str:
        ro = rollout
        ro.save(phase="starting")
        ro.set_app(canary=ro.to_cfg, canary_percent=0)
        ro.emit("slot_ready", slot=CANARY, version=ro.to_cfg.version)
        interval = ro.plan["interval_s"]
        steps: list[int] = ro.plan["steps"]
        for i, pct in enumerate(steps):
            ro.check_commands()
            ro.save(phase="step", step=i, percent=pct)
            ro.set_app(canary_percent=pct)
            ro.emit("step", step=i, percent=pct)
            verdict = ro.watch(
                interval,
                baseline_since=ro.started,
                max_seconds=ro.progress_deadline(interval),
            )
            ro.emit(
                "step_passed",
                step=i,
                percent=pct,
                decision=None if verdict is None else verdict.decision,
                reasons=[] if verdict is None else verdict.reasons,
                canary=None if verdict is None else verdict.canary,
                stable=None if verdict is None else verdict.stable,
            )
        ro.promote("all canary steps passed")
        return "succeeded"
