"""Rolling: move the stable slot to the new version in place, replica by replica.

The stable slot's ``user_config`` changes; Serve reconfigures its replicas a
few at a time and each swaps weights in place (verified by golden prompts, so
the new version's golden record is made first). Traffic never moves between
slots. After the swap the new version is watched for ``interval``; more errors
than allowed move the slot back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rayloop.config import Strategy
from rayloop.serving.routing import STABLE

if TYPE_CHECKING:
    from rayloop.rollout.controller import Rollout


class Rolling:
    kind: ClassVar[Strategy] = Strategy.ROLLING

    def run(self, rollout: Rollout) -> str:
        ro = rollout
        ro.emit("golden", version=ro.to_cfg.version)
        ro.backend.ensure_golden(ro.to_cfg)
        # What the old version did lately is the baseline the new one is judged against.
        baseline = ro.backend.window(ro.now() - 300).get(STABLE)
        ro.save(phase="rolling")
        ro.set_app(stable=ro.to_cfg)
        ro.emit("slot_ready", slot=STABLE, version=ro.to_cfg.version)
        verdict = ro.watch(ro.plan["interval_s"], slot=STABLE, baseline=baseline, require_samples=False)
        ro.emit("watch_passed", verdict=None if verdict is None else verdict.model_dump())
        ro.promote("rolled out to every stable replica")
        return "succeeded"
