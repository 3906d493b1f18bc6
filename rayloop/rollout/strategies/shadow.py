"""Shadow: mirror a share of live traffic to the new version for a while; report; serve nothing.

The shadow slot gets the new version; the stable replicas copy ``shadow_fraction`` of
answered requests to it after the primary answered. Users only ever see the
primary. At the end the pairs are summarised (agreement with production,
latency deltas, errors), the report is stored on the rollout and on the
version (annotation ``shadow``), the shadow slot is released, and production
is left as it was.

Fewer than ``min_samples`` mirrored pairs is *inconclusive*: the mirroring
goes on until the progress deadline (``progress_deadline_s``, default
``max_step_wait_factor`` times the duration), and if
the pairs are still too few the report says ``verdict: inconclusive`` and the
rollout ends ``rolled_back`` (nothing was judged, so nothing may be concluded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rayloop.config import Strategy
from rayloop.serving.routing import SHADOW

if TYPE_CHECKING:
    from rayloop.rollout.controller import Rollout


class Shadow:
    kind: ClassVar[Strategy] = Strategy.SHADOW

    def run(self, rollout: Rollout) -> str:
        ro = rollout
        ro.save(phase="starting")
        ro.set_app(shadow=ro.to_cfg, shadow_percent=100.0 * ro.settings.rollout.shadow_fraction)
        ro.emit("slot_ready", slot=SHADOW, version=ro.to_cfg.version)
        ro.save(phase="mirroring")
        started = ro.now()
        duration = ro.plan["duration_s"]
        needed = ro.settings.rollout.min_samples
        deadline = started + ro.progress_deadline(duration)
        ro.sleep(duration)
        report = ro.shadow_report(started)
        while int(report.get("pairs") or 0) < needed and ro.now() < deadline:
            ro.sleep(min(max(duration / 4, 0.05), max(deadline - ro.now(), 0.0)))
            report = ro.shadow_report(started)
        enough = int(report.get("pairs") or 0) >= needed
        report["verdict"] = "measured" if enough else "inconclusive"
        ro.emit("shadow_report", **report)
        ro.save(phase="releasing", report=report)
        # Done once no stable replica mirrors any more; the shadow's engines stop on their own.
        ro.set_app(shadow=None, shadow_percent=0, observe=False, released=frozenset({SHADOW}))
        ro.annotate("shadow", {"rollout_id": ro.rid, **report})
        ro.finish_without_promotion()
        if not enough:
            ro.emit("inconclusive", slot=SHADOW, reasons=[f"{report.get('pairs') or 0} shadow pairs < {needed} needed"])
            return "rolled_back"
        return "succeeded"
