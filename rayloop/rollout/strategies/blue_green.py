"""Blue-green: start green beside blue, smoke-test it, switch all traffic at once, hold, release blue.

Green is the ``canary`` slot. The switch is one route-table change (100% to
green), applied in place by every stable replica. During the hold blue stays
warm: a breach or ``rayloop rollback`` sends traffic back at once. After the
hold the stable slot takes green's version in place and green is released.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rayloop.config import Strategy
from rayloop.errors import RolloutError
from rayloop.serving.routing import CANARY

if TYPE_CHECKING:
    from rayloop.rollout.controller import Rollout


class BlueGreen:
    kind: ClassVar[Strategy] = Strategy.BLUE_GREEN

    def run(self, rollout: Rollout) -> str:
        ro = rollout
        ro.save(phase="starting")
        ro.set_app(canary=ro.to_cfg, canary_percent=0)
        ro.emit("slot_ready", slot=CANARY, version=ro.to_cfg.version)
        problems = ro.backend.smoke(CANARY)
        ro.emit("smoke", slot=CANARY, problems=problems)
        if problems:
            raise RolloutError(f"green ({ro.to_cfg.served_id}) failed its smoke test: {'; '.join(problems)}")
        ro.check_commands()
        ro.save(phase="switched")
        ro.set_app(canary_percent=100)
        ro.move_production(ro.to_cfg.version, "blue-green switch")
        ro.emit("switch", to=ro.to_cfg.version)
        verdict = ro.watch(ro.plan["hold_s"], baseline_since=ro.started, require_samples=False)
        ro.emit("hold_passed", verdict=None if verdict is None else verdict.model_dump())
        ro.promote("hold passed")
        return "succeeded"
