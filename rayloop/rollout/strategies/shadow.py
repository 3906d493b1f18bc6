"""Shadow: mirror a share of live traffic to the new version for a while; report; serve nothing.

The shadow slot gets the new version; the router copies ``shadow_fraction`` of
answered requests to it after the primary answered. Users only ever see the
primary. At the end the pairs are summarised (agreement with production,
latency deltas, errors), the report is stored on the rollout and on the
version (annotation ``shadow``), the shadow slot is released, and production
is left as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rayloop.config import Strategy
from rayloop.rollout.routing import SHADOW

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
        ro.sleep(ro.plan["duration_s"])
        report = ro.shadow_report(started)
        ro.emit("shadow_report", **report)
        ro.save(phase="releasing", report=report)
        ro.set_app(shadow=None, shadow_percent=0)
        ro.annotate("shadow", {"rollout_id": ro.rid, **report})
        ro.finish_without_promotion()
        return "succeeded"
