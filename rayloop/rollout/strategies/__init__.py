"""Rollout strategies, one module each, behind one interface.

A strategy gets a running :class:`~rayloop.rollout.controller.Rollout` (the
registry record, the Serve backend, the plan) and drives it with the
rollout's verbs: ``set_app`` (which version each slot serves and where traffic
goes), ``watch`` (wait while judging the canary against stable; a breach
raises), ``promote`` and ``rollback``. It returns the final status. Manual
commands (``rayloop promote|abort|rollback``) and breaches surface as
exceptions the controller turns into promote or rollback.

- :mod:`.rolling`: in-place upgrade of the stable slot through ``user_config``.
- :mod:`.blue_green`: start green, smoke-test it, switch all traffic at once, hold, release blue.
- :mod:`.canary`: traffic steps with analysis at every step, automatic rollback.
- :mod:`.shadow`: mirror a share of traffic to the new version; report; never serve it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

from rayloop.config import Strategy

if TYPE_CHECKING:
    from rayloop.rollout.controller import Rollout


class RolloutStrategy(Protocol):
    """One way to move traffic from ``rollout.from_cfg`` to ``rollout.to_cfg``."""

    kind: ClassVar[Strategy]

    def run(self, rollout: Rollout) -> str:
        """Drive the rollout; return its end status (``succeeded`` or ``rolled_back``)."""
        ...


def strategy_for(kind: Strategy) -> RolloutStrategy:
    from rayloop.rollout.strategies.blue_green import BlueGreen
    from rayloop.rollout.strategies.canary import Canary
    from rayloop.rollout.strategies.rolling import Rolling
    from rayloop.rollout.strategies.shadow import Shadow

    table: dict[Strategy, type[RolloutStrategy]] = {
        Strategy.ROLLING: Rolling,
        Strategy.BLUE_GREEN: BlueGreen,
        Strategy.CANARY: Canary,
        Strategy.SHADOW: Shadow,
    }
    return table[kind]()
