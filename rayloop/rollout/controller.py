"""The rollout controller: moves a model's traffic to a new version, and back, driven by the registry.

The registry holds the desired state and the history of every rollout
(:class:`~rayloop.registry.rollouts.RolloutBook`): the active rollout row is
the model's lock, its ``state`` says which phase it is in (written *before*
the controller acts on Serve), its ``history`` is the timeline (every event
timestamped, with per-step metrics). Aliases follow the rollout:

- ``canary`` points at the new version while it is being rolled out;
- ``production`` moves to the new version when it is promoted (blue-green: at
  the switch) and ``previous`` to the old one; a rollback moves them back.

Crash safety: if the controller dies, the rollout stays active with its phase.
:func:`reconcile` (``rayloop status --reconcile``, or running ``rayloop deploy``
again) sees that the owner is gone and finishes it: forward if it was already
promoting, else back to the old version. Serve and the aliases then agree, and
``production`` (one alias, one version) is never on two versions.

Python API (what ``rayloop deploy`` calls)::

    >>> from rayloop.rollout.controller import deploy
    >>> record = deploy(settings, "demo@3", "canary", steps=[10, 50, 100], interval_s=30)  # doctest: +SKIP
    >>> record.status, [e["event"] for e in record.history][:3]  # doctest: +SKIP
    ('succeeded', ['begin', 'plan', 'slot_ready'])
"""

from __future__ import annotations

import enum
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from rayloop.config import Settings, Strategy
from rayloop.errors import (
    AliasConflictError,
    ConfigError,
    LeaseLostError,
    NotFoundError,
    RolloutError,
    RolloutInProgressError,
)
from rayloop.registry import Lease, Phase, Registry, RolloutRecord, RolloutState
from rayloop.rollout.analysis import FAIL, INCONCLUSIVE, PASS, SlotWindow, Verdict, judge
from rayloop.rollout.backend import AppState, Backend
from rayloop.serving.protocol import ModelConfig
from rayloop.serving.routing import CANARY, SHADOW, SLOTS, STABLE, RouteTable

PRODUCTION = "production"
CANARY_ALIAS = "canary"
PREVIOUS = "previous"

HEARTBEAT_S = 5.0
OWNER_STALE_S = 60.0
"""A rollout whose owner is on another host counts as orphaned after this long without a heartbeat."""

FORWARD_PHASES = (Phase.PROMOTING,)
"""Phases after which a crashed rollout is finished forward; before them it is rolled back."""

EventSink = Callable[[dict[str, Any]], None]
_KEEP: Any = object()


class PlacementWatch:
    """Since when each replica has been without a node; fails once one has been for ``limit_s``."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s
        self.clock = clock
        self.since: dict[str, float] = {}

    def check(self, app_name: str, unplaced: dict[str, str]) -> None:
        """``unplaced``: actor name -> state of the replicas without a node now. Raises :class:`RolloutError`."""
        now = self.clock()
        # A replica that got its node, or that Serve is stopping, no longer counts (from zero if it is back).
        self.since = {name: self.since.get(name, now) for name, state in unplaced.items() if state != "STOPPING"}
        late = sorted(name for name, t in self.since.items() if now - t >= self.limit_s)
        if late:
            raise RolloutError(
                f"Serve app {app_name!r}: {len(late)} replica(s) found no node within {self.limit_s:g}s "
                f"({', '.join(late)}); the cluster has no room for them",
                hint="Add a node or free CPUs/GPUs (`ray status` shows what is left), or raise "
                "rollout.placement_timeout_s where an autoscaler adds nodes or a runtime env takes long to set up.",
            )


class Command(enum.StrEnum):
    PROMOTE = "promote"
    ABORT = "abort"
    ROLLBACK = "rollback"


class Reconciled(BaseModel):
    """What :func:`reconcile` did: ``action`` is ``none``, ``rolled_forward``, ``rolled_back`` or ``repaired``."""

    action: str
    reason: str | None = Field(default=None, description="Why nothing was done (action none).")
    rollout: RolloutRecord | None = Field(default=None, description="The rollout that finished or repaired.")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.rollout is not None:
            out["rollout"] = self.rollout.to_json()
        return out


class Interrupted(Exception):
    """A manual command arrived while a strategy ran."""

    def __init__(self, command: Command, by: str) -> None:
        super().__init__(f"{command} by {by}")
        self.command = command
        self.by = by


class Breach(Exception):
    """Canary analysis failed: roll back."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__("; ".join(r for r in verdict.reasons[:3]))
        self.verdict = verdict


class StatsLost(RuntimeError):
    """The stats store restarted inside the window being judged: what it saw before is gone."""


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_dead(record: RolloutRecord) -> bool:
    """The owner runs on this host and its process is gone (a PID that is alive may be reused: not proof)."""
    host, _, pid = str(record.owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def owner_alive(record: RolloutRecord, now: float | None = None, *, lease: Lease | None = None) -> bool:
    """May the controller of this rollout still act? Not when its process is known dead; otherwise while its
    lease has not expired (rollouts recorded before leases: while their heartbeat is fresh)."""
    if owner_dead(record):
        return False
    now = now or time.time()
    if lease is not None:
        return lease.expires_at > now
    from datetime import datetime

    updated = datetime.fromisoformat(record.updated_at or "1970-01-01T00:00:00+00:00").timestamp()
    return now - updated < OWNER_STALE_S


class _LeaseKeeper:
    """Renews a rollout's lease from a thread (also while the controller waits on Serve); ``lost`` once another
    controller took the rollout over."""

    def __init__(self, reg: Registry, rid: int, token: int, lease_s: float) -> None:
        self.reg, self.rid, self.token, self.lease_s = reg, rid, token, lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rayloop-lease-{rid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.reg.renew_lease(self.rid, self.token, self.lease_s)
            except LeaseLostError:
                self.lost = True
                return
            except Exception:
                pass  # the database is unreachable for a moment: the next try may work; expiry is the bound

    def stop(self) -> None:
        self._stop.set()


def parse_duration(value: str | float | int) -> float:
    """``"30s"``, ``"2m"``, ``"500ms"``, ``"1h"`` or plain seconds -> seconds."""
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"duration {value!r} is negative")
        return float(value)
    text = value.strip().lower()
    number, scale = text, 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], factor
            break
    try:
        seconds = float(number) * scale
    except ValueError:
        raise ConfigError(
            f"duration {value!r} is not understood", hint="Use e.g. 30s, 2m, 500ms, 1h or a number of seconds."
        ) from None
    if seconds < 0:
        raise ConfigError(f"duration {value!r} is negative")
    return seconds


def parse_steps(value: str | list[int]) -> list[int]:
    """``"5,25,50,100"`` -> ``[5, 25, 50, 100]`` (validated like ``rollout.canary_steps``)."""
    from pydantic import ValidationError

    from rayloop.config import RolloutSettings

    if isinstance(value, str):
        try:
            steps = [int(p) for p in value.split(",") if p.strip()]
        except ValueError:
            raise ConfigError(
                f"steps {value!r} are not comma-separated integers", hint="Use e.g. 5,25,50,100."
            ) from None
    else:
        steps = list(value)
    try:
        RolloutSettings(canary_steps=steps)
    except ValidationError as e:
        raise ConfigError(f"steps: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return steps


def _strategy(value: Strategy | str) -> Strategy:
    try:
        return Strategy(value)
    except ValueError:
        raise ConfigError(
            f"strategy {value!r} is not one of {', '.join(s.value for s in Strategy)}",
            hint="Pass --strategy rolling|blue-green|canary|shadow.",
        ) from None


class Rollout:
    """One rollout in progress: the registry record, the Serve backend and the verbs strategies use."""

    def __init__(
        self,
        settings: Settings,
        reg: Registry,
        backend: Backend,
        rid: int,
        *,
        name: str,
        from_cfg: ModelConfig | None,
        to_cfg: ModelConfig,
        plan: dict[str, Any],
        app: AppState | None,
        state: RolloutState | None = None,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.time,
        sleeper: Callable[[float], None] = time.sleep,
        token: int = 1,
    ) -> None:
        self.settings, self.reg, self.backend, self.rid = settings, reg, backend, rid
        self.fence = (rid, token)
        self.lease = _LeaseKeeper(reg, rid, token, settings.rollout.lease_s)
        self.name, self.from_cfg, self.to_cfg, self.plan = name, from_cfg, to_cfg, plan
        self.app = app
        self.state = state or RolloutState()
        self.on_event = on_event
        self.now = clock
        limit = settings.rollout.placement_timeout_s
        self.placement = PlacementWatch(limit, clock=clock) if limit is not None else None
        self._sleep = sleeper
        self.started = self.state.started if self.state.started is not None else clock()
        # Commands already in the history (e.g. the one a reconcile acts on) are not new.
        self._handled = {i for i, ev in enumerate(reg.rollout(rid).history) if ev.get("event") == "command"}
        self._last_beat = clock()
        self._last_stable: SlotWindow | None = None  # stable over the last step it had traffic

    # -- bookkeeping -----------------------------------------------------------
    def emit(self, event: str, **data: Any) -> None:
        """Append a timestamped event to the rollout's history (and tell ``on_event``)."""
        payload = {"event": event, **data}
        self.reg.update_rollout(self.rid, event=payload, fence=self.fence)
        self._last_beat = self.now()
        if self.on_event is not None:
            try:
                self.on_event({"time": self.now(), "rollout_id": self.rid, **payload})
            except Exception:
                pass  # a broken callback must not break the rollout

    def tell(self, event: str, **data: Any) -> None:
        """Tell ``on_event`` something that is progress, not history (nothing is recorded)."""
        if self.on_event is not None:
            try:
                self.on_event({"time": self.now(), "rollout_id": self.rid, "event": event, **data})
            except Exception:
                pass  # a broken callback must not break the rollout

    def wait_serve(self, state: AppState, released: frozenset[str] = frozenset(), *, whole: bool = True) -> None:
        """Wait until Serve runs ``state`` (``released`` slots aside), telling ``on_event`` each change of the
        app's status (``serve`` events: which deployments, which replica states) while replicas start. Waiting
        for the kept slots whole, a replica of theirs that finds no node ends it (``rollout.placement_timeout_s``);
        a rollback's way back (``whole=False``) waits for what runs, not for what cannot be placed."""
        kept = frozenset(SLOTS) - released

        def check() -> None:
            self.still_owned()
            if whole:
                self.check_placement(kept)

        self.backend.wait(
            state,
            self.settings.rollout.ready_timeout_s,
            check=check,
            progress=lambda line: self.tell("serve", status=line),
            released=released,
            whole=whole,
        )

    def save(self, **updates: Any) -> None:
        """Merge ``updates`` (fields of :class:`RolloutState`) into the persisted state (written before acting on
        it); the rollout's status is its phase until it ends."""
        self.state = self.state.updated(**updates)
        self.reg.update_rollout(self.rid, state=self.state, status=self.state.phase.value, fence=self.fence)
        self._last_beat = self.now()

    def beat(self) -> None:
        """Stop at once when another controller took over (the lease thread noticed); else keep updated_at fresh."""
        self.still_owned()
        if self.now() - self._last_beat >= HEARTBEAT_S:
            self.reg.update_rollout(self.rid, fence=self.fence)
            self._last_beat = self.now()

    def still_owned(self) -> None:
        """Cheap, for polling loops: stop once the lease thread saw another controller take over."""
        if self.lease.lost:
            raise LeaseLostError(f"rollout {self.rid} was taken over by another controller; this one stops")

    def check_lease(self) -> None:
        """Right before a Serve change: still ours? (Every registry write checks it in its own transaction.)"""
        lease = self.reg.lease(self.rid)
        if self.lease.lost or (lease is not None and lease.token != self.fence[1]):
            raise LeaseLostError(f"rollout {self.rid} was taken over by another controller; this one stops")

    def end(self, status: str) -> None:
        """Record the outcome and release the lease."""
        self.reg.end_rollout(self.rid, status, fence=self.fence)
        self.lease.stop()

    def check_commands(self) -> None:
        """Raise :class:`Interrupted` if ``rayloop promote|abort|rollback`` was issued."""
        for i, ev in enumerate(self.reg.rollout(self.rid).history):
            if ev.get("event") == "command" and i not in self._handled:
                self._handled.add(i)
                raise Interrupted(Command(ev["command"]), str(ev.get("by", "?")))

    def sleep(self, seconds: float) -> None:
        """Sleep while keeping the heartbeat and listening for commands."""
        end = self.now() + seconds
        while True:
            self.check_commands()
            self.beat()
            left = end - self.now()
            if left <= 0:
                return
            self._sleep(min(left, 0.5))

    # -- Serve -----------------------------------------------------------------
    def set_app(
        self,
        *,
        stable: ModelConfig | None = _KEEP,
        canary: ModelConfig | None = _KEEP,
        shadow: ModelConfig | None = _KEEP,
        canary_percent: float | None = None,
        shadow_percent: float | None = None,
        observe: bool = True,
        released: frozenset[str] = frozenset(),
        whole: bool = True,
    ) -> AppState:
        """Ask Serve for a new state (changing only what is given) and wait until it is there.

        ``observe``: the ingress sends live per-slot observations to the stats actor (while the rollout
        judges traffic; the rollout's last change turns it off, back to the lean layout). ``released``: slots
        that route nothing in the new state and are not waited for (a rollback's way out of a broken canary);
        ``whole=False``: the kept slots' running replicas must serve the new state, not all they should have."""
        cur = self.app or self.backend.read()
        if cur is None:
            raise RolloutError(f"Serve app {self.backend.app_name!r} does not exist")
        slots = dict(cur.slots)
        for slot, value in ((STABLE, stable), (CANARY, canary), (SHADOW, shadow)):
            if value is not _KEEP:
                slots[slot] = value
        t = cur.table
        table = RouteTable(
            canary_percent=t.canary_percent if canary_percent is None else canary_percent,
            shadow_percent=t.shadow_percent if shadow_percent is None else shadow_percent,
            sticky=t.sticky,
            salt=f"rollout-{self.rid}",
            versions={s: c.version for s, c in slots.items() if c is not None},
            rollout_id=self.rid,
            epoch=t.epoch + 1,
            observe=observe,
        )
        new = AppState(model=self.name, slots=slots, table=table)
        self.save(desired=new.summary())
        t0 = self.now()
        self.check_lease()
        self.backend.apply(new)
        self.wait_serve(new, released, whole=whole)
        self.app = new
        self._mark(new)
        if (t.canary_percent, t.shadow_percent) != (table.canary_percent, table.shadow_percent):
            # How long the traffic change took to reach every stable replica (switch/rollback time).
            self.emit(
                "traffic",
                canary_percent=table.canary_percent,
                shadow_percent=table.shadow_percent,
                seconds=round(self.now() - t0, 3),
            )
        return new

    def _mark(self, state: AppState) -> None:
        for slot in SLOTS:
            cfg = state.slots.get(slot)
            if cfg is None:
                self.reg.unmark_deployed(self.name, slot, self.backend.app_name, fence=self.fence)
            else:
                self.reg.mark_deployed(self.name, cfg.version, slot, self.backend.app_name, fence=self.fence)

    # -- judging ---------------------------------------------------------------
    def progress_deadline(self, interval: float) -> float:
        """Seconds a step of ``interval`` may take while it waits for enough samples."""
        r = self.settings.rollout
        return max(
            interval, r.progress_deadline_s if r.progress_deadline_s is not None else interval * r.max_step_wait_factor
        )

    def watch(
        self,
        seconds: float,
        *,
        slot: str = CANARY,
        baseline_since: float | None = None,
        baseline: SlotWindow | None = None,
        max_seconds: float | None = None,
        require_samples: bool = True,
    ) -> Verdict | None:
        """Wait ``seconds`` judging ``slot`` against stable; raise :class:`Breach` to roll back.

        Returns the last verdict (None if nothing was judged). A failed check rolls back once more than
        ``rollout.failure_limit`` judgements failed. An inconclusive verdict (too few samples, or measurements
        failing more than ``consecutive_error_limit`` times in a row) extends the wait up to ``max_seconds``;
        still inconclusive then, it fails closed: it rolls back (or holds, ``rollout.inconclusive: hold``),
        never passes. ``require_samples=False`` is for strategies judged by the golden check (rolling,
        blue-green): live traffic, when there is some, can only fail them. With ``rollout.dry_run`` every
        verdict is recorded and none is acted on.
        """
        r = self.settings.rollout
        t0 = self.now()
        end, hard = t0 + seconds, t0 + max(seconds, max_seconds or seconds)
        verdict: Verdict | None = None
        # Requests queued across the traffic shift settle first; they would skew latency.
        since = t0 + (r.initial_delay_s if r.initial_delay_s is not None else min(5.0, seconds * 0.1))
        failures = errors = 0
        while True:
            self.sleep(min(0.5, max(0.05, seconds / 4)))
            self.check_placement()
            final = self.now() >= end
            try:
                verdict = self._judge(since, slot, baseline_since, baseline, latency=final)
                errors = 0
            except Exception as e:  # the stats actor is gone or slow: no measurement this time
                errors += 1
                self.emit("measurement_error", slot=slot, error=f"{type(e).__name__}: {e}"[:300], in_a_row=errors)
                if errors <= r.consecutive_error_limit and self.now() < hard:
                    continue
                verdict = Verdict(
                    decision=INCONCLUSIVE,
                    reasons=[f"{errors} measurements in a row failed ({type(e).__name__}: {e})"[:500]],
                )
                self._inconclusive(slot, verdict, self.now() - t0)
                return verdict
            if verdict.decision == FAIL:
                failures += 1
                if failures > r.failure_limit:
                    self._act("breach", slot, verdict)
                    failures = 0  # dry run: go on judging
            now = self.now()
            if now >= end and (verdict.decision == PASS or now >= hard):
                if verdict.decision == FAIL:  # tolerated so far, but the step ends failing
                    self._act("breach", slot, verdict)
                elif verdict.decision == INCONCLUSIVE and require_samples:
                    self._inconclusive(slot, verdict, now - t0)
                return verdict

    def check_placement(self, slots: frozenset[str] = frozenset(SLOTS)) -> None:
        """Fail the step (RolloutError: rolled back) once a replica of ``slots`` has gone
        ``rollout.placement_timeout_s`` without a node: a node was lost and there is no room for what it ran.
        How long each has waited carries over from one look to the next, across holds and waits for Serve."""
        if self.placement is None:
            return
        try:
            without_node = self.backend.unplaced(slots)
        except Exception:  # Serve's details unreadable this once: the next look tells
            return
        self.placement.check(self.backend.app_name, without_node)

    def _act(self, event: str, slot: str, verdict: Verdict) -> None:
        """Record ``verdict`` under ``event`` and roll back (:class:`Breach`); under dry_run only record it."""
        name = f"dry_run_{event}" if self.settings.rollout.dry_run else event
        self.emit(name, slot=slot, reasons=verdict.reasons, canary=verdict.canary, stable=verdict.stable)
        if not self.settings.rollout.dry_run:
            raise Breach(verdict)

    def _inconclusive(self, slot: str, verdict: Verdict, waited: float) -> None:
        """Fail closed on a step nobody could judge: roll back, or hold until a person decides."""
        why = [f"inconclusive after {waited:.0f}s: too little traffic to judge", *verdict.reasons]
        verdict = verdict.model_copy(update={"reasons": why})
        if self.settings.rollout.inconclusive == "hold" and not self.settings.rollout.dry_run:
            self.emit("hold", slot=slot, reasons=verdict.reasons, canary=verdict.canary, stable=verdict.stable)
            self.save(phase="holding", reason=why[0])
            while True:  # traffic stays as it is; `rayloop promote|abort|rollback` ends this (Interrupted)
                self.sleep(1.0)
        self._act("inconclusive", slot, verdict)

    def _judge(
        self,
        since: float,
        slot: str,
        baseline_since: float | None,
        baseline: SlotWindow | None,
        *,
        latency: bool = True,
    ) -> Verdict:
        started = self.backend.stats_since()
        if started > since:
            # A killed or restarted stats actor comes back empty: a window it only partly saw could pass a
            # canary on the requests after the restart alone. Judge nothing; enough of these end the step
            # inconclusive (rolled back or held, never promoted).
            raise StatsLost(
                f"the stats store restarted {started - since:.1f}s into the window being judged; "
                "the observations before that are lost"
            )
        w = self.backend.window(since)
        cand = w.get(slot, SlotWindow())
        base = baseline
        enough = self.settings.rollout.min_samples
        if base is None:
            base = w.get(STABLE, SlotWindow()) if slot != STABLE else SlotWindow()
            if base.requests >= enough and slot != STABLE:
                self._last_stable = base
            elif self._last_stable is not None:
                # At 100% stable has no traffic: compare with stable in the previous step (similar load).
                base = self._last_stable
            elif baseline_since is not None:
                # Right after a switch: judge against what stable did before it.
                # (from when the stats store started, if that was later: it holds nothing before)
                base = self.backend.window(max(baseline_since, started)).get(STABLE, SlotWindow())
        return judge(cand, base, self.settings.rollout, latency=latency)

    def shadow_report(self, since: float) -> dict[str, Any]:
        w = self.backend.window(since)
        report = self.backend.shadow_window(since)
        report["primary"] = w.get(STABLE, SlotWindow()).summary()
        return report

    # -- aliases ---------------------------------------------------------------
    def _alias(self, alias: str, version: int | None, reason: str) -> None:
        actor = f"rollout:{self.rid}"
        current = self.reg.get_alias(self.name, alias)
        if current == version:
            return
        if version is None:
            if current is not None:
                self.reg.delete_alias(self.name, alias, expect=current, actor=actor, reason=reason, fence=self.fence)
        else:
            self.reg.set_alias(
                self.name, alias, version, expect=current or 0, actor=actor, reason=reason, fence=self.fence
            )

    def move_production(self, version: int, reason: str) -> None:
        """``production`` -> ``version`` and ``previous`` -> the old production (compare-and-set)."""
        before = self.state.aliases_before
        cur = self.reg.get_alias(self.name, PRODUCTION)
        if cur == version:
            return
        expected = {None, before.get(PRODUCTION), None if self.from_cfg is None else self.from_cfg.version}
        if cur not in expected:
            raise AliasConflictError(
                f"alias {self.name}@production was moved to version {cur} during rollout {self.rid}; not overriding it"
            )
        if cur is not None:
            self._alias(PREVIOUS, cur, reason)
        self._alias(PRODUCTION, version, reason)
        self.emit("alias", alias=PRODUCTION, version=version, was=cur)

    def annotate(self, key: str, value: Any) -> None:
        self.reg.annotate(
            f"{self.name}@{self.to_cfg.version}", key, value, actor=f"rollout:{self.rid}", fence=self.fence
        )

    # -- endings ---------------------------------------------------------------
    def promote(self, reason: str) -> None:
        """Make the new version production everywhere: aliases, stable slot, traffic; release the others."""
        self.save(phase="promoting", reason=reason)
        self.emit("promote", reason=reason)
        cur = self.app or self.backend.read()
        if cur is not None and cur.slots.get(STABLE) != self.to_cfg:
            # The stable slot will swap in place, verified against the new version's golden answers. Recording
            # them takes a fresh engine: do it before anything moves, so that a cluster with no room for it
            # (bounded by rollout.ready_timeout_s) ends in a rollback with production untouched.
            self.backend.ensure_golden(self.to_cfg)
        self.move_production(self.to_cfg.version, reason)
        if cur is None:  # crashed before the first deploy reached Serve
            from rayloop.serving.app import idle_state

            first = idle_state(self.name, self.to_cfg, RouteTable(epoch=1))
            self.check_lease()
            self.backend.apply(first)
            self.wait_serve(first)
            self.app = cur = first
        if cur.slots.get(CANARY) == self.to_cfg and cur.table.canary_percent < 100:
            self.set_app(canary_percent=100)  # a manual promote mid-canary: everything to the new version first
        if cur.slots.get(STABLE) != self.to_cfg:
            # All traffic is on the canary slot (or nowhere new yet): stable swaps in place unseen.
            self.set_app(stable=self.to_cfg)
        self.set_app(canary_percent=0, shadow_percent=0)
        # The canary's engines stop on their own; the rollout is done once stable serves all (as a rollback).
        self.set_app(canary=None, shadow=None, observe=False, released=frozenset({CANARY, SHADOW}))
        self._alias(CANARY_ALIAS, None, reason)
        self.save(phase="done")

    def rollback(self, reason: str) -> None:
        """All traffic to the old version at once, new version released, aliases back.

        The way back waits only for what it keeps: the stable slot's running replicas on the old version. A
        canary or shadow slot that cannot become ready (its node died and there is no room for its replicas)
        is released without waiting for it, and stable replicas lost with that node are not waited for either:
        the room they need may be what the released canary holds until it is gone (Serve starts them again by
        itself). The aliases go back even when Serve does not get there in time, so the
        registry never names the rolled-back version production.
        """
        self.save(phase="rolling_back", reason=reason)
        self.emit("rollback", reason=reason)
        old = self.from_cfg
        cur = self.app or self.backend.read()
        try:
            if cur is not None and old is not None:
                if cur.slots.get(STABLE) != old:
                    self.backend.ensure_golden(old)
                # Traffic first (one route-table change), then free the new version's engines.
                out = frozenset({CANARY, SHADOW})
                self.set_app(stable=old, canary_percent=0, shadow_percent=0, released=out, whole=False)
                self.set_app(canary=None, shadow=None, observe=False, released=out, whole=False)
        finally:
            before = self.state.aliases_before
            if old is not None and self.reg.get_alias(self.name, PRODUCTION) == self.to_cfg.version:
                self._alias(PRODUCTION, before.get(PRODUCTION, old.version), f"rollback: {reason}")
                self._alias(PREVIOUS, before.get(PREVIOUS), f"rollback: {reason}")
                self.emit(
                    "alias", alias=PRODUCTION, version=before.get(PRODUCTION, old.version), was=self.to_cfg.version
                )
            if self.reg.get_alias(self.name, CANARY_ALIAS) == self.to_cfg.version:
                self._alias(CANARY_ALIAS, None, f"rollback: {reason}")
        self.save(phase="done")

    def finish_without_promotion(self) -> None:
        """Shadow runs end here: nothing served changes."""
        if self.reg.get_alias(self.name, CANARY_ALIAS) == self.to_cfg.version:
            self._alias(CANARY_ALIAS, None, "shadow run finished")
        self.save(phase="done")


# -- entry points ---------------------------------------------------------------
def _default_backend(settings: Settings, *, start_local: bool = True) -> Backend:
    """A Serve backend on the configured cluster (``start_local``: else on a private local Ray)."""
    import ray

    from rayloop.rollout.backend import ServeBackend

    if not ray.is_initialized():
        if start_local:
            from rayloop.raysession import ensure_ray

            ensure_ray(settings)
        else:
            from rayloop import cluster

            cluster.connect(settings)  # ClusterError when there is none: status works without Serve
    from rayloop.serving.auth import load_key_hashes

    # Keys given to this process reach a new app as hashes (never in clear in the Serve config).
    return ServeBackend(settings, api_key_hashes=sorted(load_key_hashes(settings.serving)))


def _plan(
    settings: Settings,
    strategy: Strategy,
    steps: list[int] | None,
    interval_s: float | str | None,
    hold_s: float | str | None,
    force: bool,
) -> dict[str, Any]:
    r = settings.rollout
    interval = r.interval_s if interval_s is None else parse_duration(interval_s)
    return {
        "strategy": strategy.value,
        "steps": parse_steps(steps) if steps is not None else list(r.canary_steps),
        "interval_s": interval,
        "hold_s": r.hold_s if hold_s is None else parse_duration(hold_s),
        "duration_s": (r.shadow_duration_s if interval_s is None else interval),
        "shadow_fraction": r.shadow_fraction,
        "force": force,
    }


def _check_gate(mv: Any, force: bool) -> dict[str, Any] | None:
    gate = mv.annotations.get("gate") if isinstance(mv.annotations, dict) else None
    decision = gate.get("decision") if isinstance(gate, dict) else None
    if decision == "rejected" and not force:
        reasons = "; ".join(str(r) for r in (gate or {}).get("reasons", [])[:3]) or "no reasons recorded"
        raise RolloutError(
            f"{mv.name}@{mv.version} was rejected by the validation gate ({reasons}); refusing to deploy it",
            hint="Deploy a version the gate accepted, or pass --force to deploy it anyway.",
        )
    return gate if isinstance(gate, dict) else None


def _check_vouched(
    mv: Any, gate: dict[str, Any] | None, running: ModelConfig | None, aliases: dict[str, int], force: bool
) -> None:
    """Rolling a version out over a running one needs the gate's acceptance (or ``force``). Not needed: the first
    deploy, the version already running, and a version that was production before (``production``/``previous``)."""
    if force or running is None or running.version == mv.version:
        return
    if mv.version in (aliases.get(PRODUCTION), aliases.get(PREVIOUS)):
        return
    decision = (gate or {}).get("decision")
    if decision != "accepted":
        raise RolloutError(
            f"{mv.name}@{mv.version} has no accepted gate decision ({decision or 'never evaluated'}); refusing to "
            f"roll it out over v{running.version}",
            hint=f"Run the validation gate first (`rayloop eval {mv.name}@{mv.version}`), or pass --force.",
        )


def preflight(
    settings: Settings, ref: str, force: bool, *, reg: Registry | None = None
) -> tuple[Any, dict[str, Any] | None]:
    """Check the API's auth policy, resolve ``ref`` and apply the gate check (no cluster needed); return the
    version and its gate record."""
    from rayloop.serving.auth import check_auth_policy, load_key_hashes

    check_auth_policy(settings.serving, load_key_hashes(settings.serving))
    mv = (reg or Registry.from_settings(settings)).resolve(ref)
    return mv, _check_gate(mv, force)


def deploy(
    settings: Settings,
    ref: str,
    strategy: Strategy | str,
    *,
    steps: list[int] | None = None,
    interval_s: float | str | None = None,
    hold_s: float | str | None = None,
    force: bool = False,
    on_event: EventSink | None = None,
    backend: Backend | None = None,
) -> RolloutRecord:
    """Roll ``ref`` (``NAME@VERSION|ALIAS``) out with ``strategy``; return the final rollout record.

    ``interval_s``/``hold_s`` take seconds or durations such as ``"30s"``;
    ``steps`` default to ``rollout.canary_steps``.

    The record has ``status`` (``succeeded``, ``rolled_back``, ``aborted`` or
    ``failed``), ``state`` (phase, reason, shadow report) and ``history``: the
    timeline, each event with ``time`` and, for canary steps, the canary and
    stable numbers. Raises :class:`RolloutInProgressError` while another rollout
    of the model runs, :class:`RolloutError` for a version the gate rejected
    (unless ``force``). A new app (nothing deployed yet) is simply started on
    ``ref``.
    """
    kind = _strategy(strategy)
    plan = _plan(settings, kind, steps, interval_s, hold_s, force)
    reg = Registry.from_settings(settings)
    mv, gate = preflight(settings, ref, force, reg=reg)
    be = backend or _default_backend(settings)
    name = mv.name
    be.select(name)

    active = reg.active_rollout(name)
    if active is not None:
        if owner_alive(active, lease=reg.lease(active.id)):
            raise RolloutInProgressError(
                f"rollout {active.id} of {name!r} (v{active.from_version} -> v{active.to_version}, "
                f"{active.strategy}) is running, owned by {active.owner}"
            )
        reconcile(settings, name, backend=be, on_event=on_event)

    current = be.read()
    if current is not None and current.model != name:
        raise RolloutError(
            f"Serve app {be.app_name!r} serves model {current.model!r}, not {name!r}",
            hint="Set serving.app_name to a separate app per model.",
        )
    to_cfg = ModelConfig(model=name, version=mv.version, fingerprint=mv.fingerprint)
    from_cfg = current.slots.get(STABLE) if current is not None else None
    aliases = reg.aliases(name)
    _check_vouched(mv, gate, from_cfg, aliases, force)
    rid = reg.begin_rollout(
        name,
        from_version=None if from_cfg is None else from_cfg.version,
        to_version=mv.version,
        strategy=kind.value,
        plan=plan,
        owner=owner_id(),
        lease_s=settings.rollout.lease_s,
    )
    ro = Rollout(
        settings, reg, be, rid, name=name, from_cfg=from_cfg, to_cfg=to_cfg, plan=plan, app=current, on_event=on_event
    )
    try:
        ro.save(
            phase="planned",
            started=ro.started,
            from_cfg=None if from_cfg is None else from_cfg.model_dump(),
            to_cfg=to_cfg.model_dump(),
            aliases_before={k: aliases.get(k) for k in (PRODUCTION, PREVIOUS, CANARY_ALIAS)},
        )
        ro.emit("plan", plan=plan, gate=None if gate is None else gate.get("decision"), app=be.app_name)
    except BaseException:
        ro.lease.stop()
        raise
    return _run(ro, kind)


def _run(ro: Rollout, kind: Strategy) -> RolloutRecord:
    try:
        return _run_owned(ro, kind)
    finally:
        ro.lease.stop()


def _run_owned(ro: Rollout, kind: Strategy) -> RolloutRecord:
    from rayloop.rollout.strategies import strategy_for

    reg = ro.reg
    try:
        if ro.from_cfg is None:
            status = _first_deploy(ro)
        elif ro.from_cfg == ro.to_cfg:
            ro.emit("noop", reason=f"{ro.to_cfg.served_id} is already on the stable slot")
            ro.move_production(ro.to_cfg.version, "already serving")
            ro.save(phase="done")
            status = "succeeded"
        else:
            if kind != Strategy.SHADOW:  # a shadow version never serves, so it is no canary
                ro._alias(CANARY_ALIAS, ro.to_cfg.version, f"{kind.value} rollout {ro.rid}")
            # The stats store exists before any traffic moves (a store started later would fail the first
            # step's judgement as a restart).
            ro.backend.stats_since()
            status = strategy_for(kind).run(ro)
    except Interrupted as i:
        ro.emit("command_received", command=i.command.value, by=i.by)
        if i.command == Command.PROMOTE:
            ro.promote(f"promoted by {i.by}")
            status = "succeeded"
        else:
            ro.rollback(f"{i.command.value} by {i.by}")
            status = "aborted" if i.command == Command.ABORT else "rolled_back"
    except Breach as b:
        ro.rollback("; ".join(b.verdict.reasons[:3]))
        status = "rolled_back"
    except LeaseLostError as e:
        # Another controller owns the rollout now: write nothing, not even a rollback. Unless a Serve config of
        # ours went out after the loss (we froze between the lock's check and the apply): then Serve may run
        # that stale config, and it is brought back to what the registry says.
        if e.stale_apply:
            _repair_after_stale_apply(ro)
        raise
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        try:
            ro.rollback(f"error: {reason}")
        except LeaseLostError:
            raise
        except BaseException as e2:
            ro.emit("rollback_failed", reason=f"{type(e2).__name__}: {e2}")
            ro.end("failed")
            if isinstance(e2, KeyboardInterrupt):
                raise
            raise RolloutError(
                f"rollout {ro.rid} failed ({reason}) and so did its rollback ({type(e2).__name__}: {e2}); the "
                f"aliases are back, Serve may still run the new version",
                hint=f"Fix what stops Serve (`serve status`, the replica logs), then `rayloop status {ro.name} "
                "--reconcile` brings Serve back to the registry's production.",
            ) from e2
        ro.end("failed")
        if isinstance(e, KeyboardInterrupt):
            raise
        if type(e) is RolloutError:  # say that it was rolled back; subclasses keep their type for callers
            raise RolloutError(f"rollout {ro.rid} failed and was rolled back: {e.message}", hint=e.hint) from e
        raise RolloutError(f"rollout {ro.rid} failed and was rolled back: {reason}") from e
    ro.end(status)
    return reg.rollout(ro.rid)


def _repair_after_stale_apply(ro: Rollout) -> None:
    """Serve may run a config this controller applied after losing its lease: reconcile Serve with the registry
    (a rollout still held by a live controller is left to it; its own waits see the change)."""
    import logging

    log = logging.getLogger("rayloop")
    try:
        out = reconcile(ro.settings, ro.name, backend=ro.backend, actor=f"stale-apply repair of rollout {ro.rid}")
        log.warning("rollout %s: a stale Serve config went out; reconcile: %s", ro.rid, out.action)
    except Exception as e:  # the original LeaseLostError is what the caller must see
        log.error("rollout %s: repairing Serve after a stale apply failed: %s", ro.rid, e)


def _first_deploy(ro: Rollout) -> str:
    """Nothing runs yet: start the app with ``to`` on stable."""
    from rayloop.serving.app import idle_state

    ro.save(phase="starting")
    ro.emit("first_deploy", version=ro.to_cfg.version)
    state = idle_state(
        ro.name,
        ro.to_cfg,
        RouteTable(salt=f"rollout-{ro.rid}", versions={STABLE: ro.to_cfg.version}, rollout_id=ro.rid, epoch=1),
    )
    ro.save(phase="promoting", desired=state.summary())
    ro.check_lease()
    ro.backend.apply(state)
    ro.wait_serve(state)
    ro.app = state
    ro._mark(state)
    ro.emit("slot_ready", slot=STABLE, version=ro.to_cfg.version)
    ro.move_production(ro.to_cfg.version, "first deploy")
    ro.save(phase="done")
    return "succeeded"


def _resume(
    settings: Settings, reg: Registry, backend: Backend, record: RolloutRecord, on_event: EventSink | None
) -> Rollout:
    """Take an orphaned rollout over (a new fencing token: its old controller can write nothing more)."""
    token = reg.take_lease(record.id, owner_id(), settings.rollout.lease_s, force=owner_dead(record))
    st = record.state
    to_cfg = (
        ModelConfig.model_validate(st.to_cfg)
        if st.to_cfg
        else ModelConfig(model=record.name, version=record.to_version)
    )
    from_cfg = ModelConfig.model_validate(st.from_cfg) if st.from_cfg else None
    return Rollout(
        settings,
        reg,
        backend,
        record.id,
        name=record.name,
        from_cfg=from_cfg,
        to_cfg=to_cfg,
        plan=record.plan,
        app=None,
        state=st,
        on_event=on_event,
        token=token,
    )


def reconcile(
    settings: Settings,
    name: str,
    *,
    backend: Backend | None = None,
    intent: Command | None = None,
    actor: str = "reconcile",
    on_event: EventSink | None = None,
) -> Reconciled:
    """Bring Serve and the aliases of ``name`` to a consistent state; return what was done.

    An active rollout whose controller is gone is finished: forward if it was
    promoting (or ``intent`` is promote), else rolled back. Without an active
    rollout, Serve is brought back to ``production`` on the stable slot with
    nothing else routed (drift after a crash between the registry and Serve).
    A rollout whose controller is alive is left alone (use :func:`send_command`).
    """
    reg = Registry.from_settings(settings)
    be = backend or _default_backend(settings)
    be.select(name)
    active = reg.active_rollout(name)
    if active is not None:
        if intent is None and owner_alive(active, lease=reg.lease(active.id)):
            return Reconciled(action="none", reason=f"rollout {active.id} is running (owner {active.owner})")
        ro = _resume(settings, reg, be, active, on_event)
        phase = active.state.phase
        forward = intent == Command.PROMOTE or (intent is None and phase in FORWARD_PHASES)
        why = (
            f"{intent.value} by {actor}"
            if intent is not None
            else f"controller {active.owner} is gone (phase {phase.value})"
        )
        try:
            ro.emit("reconcile", forward=forward, reason=why, token=ro.fence[1])
            if forward:
                ro.promote(why)
                status = "succeeded"
            else:
                ro.rollback(why)
                status = "aborted" if intent == Command.ABORT else "rolled_back"
            ro.end(status)
        finally:
            ro.lease.stop()
        return Reconciled(action="rolled_forward" if forward else "rolled_back", rollout=reg.rollout(active.id))

    current = be.read()
    prod = reg.get_alias(name, PRODUCTION)
    if current is None or prod is None or current.model != name:
        return Reconciled(action="none", reason="nothing deployed" if current is None else "no production alias")
    stable = current.slots.get(STABLE)
    drift = (
        stable is None
        or stable.version != prod
        or current.table.canary_percent != 0
        or current.table.shadow_percent != 0
        or any(current.slots.get(s) is not None for s in (CANARY, SHADOW))
    )
    if not drift:
        return Reconciled(action="none", reason="Serve matches the registry")
    mv = reg.resolve(f"{name}@{prod}")
    want = ModelConfig(model=name, version=prod, fingerprint=mv.fingerprint)
    rid = reg.begin_rollout(
        name,
        from_version=None if stable is None else stable.version,
        to_version=prod,
        strategy="reconcile",
        plan={},
        owner=owner_id(),
        lease_s=settings.rollout.lease_s,
    )
    ro = Rollout(
        settings, reg, be, rid, name=name, from_cfg=stable, to_cfg=want, plan={}, app=current, on_event=on_event
    )
    try:
        ro.save(phase="promoting", to_cfg=want.model_dump(), from_cfg=None if stable is None else stable.model_dump())
        ro.emit("reconcile", reason="Serve differs from the registry", app=current.summary(), production=prod)
        try:
            ro.promote("reconcile Serve with production")
        except LeaseLostError:
            raise
        except BaseException:
            ro.end("failed")
            raise
        ro.end("succeeded")
    finally:
        ro.lease.stop()
    return Reconciled(action="repaired", rollout=reg.rollout(rid))


def send_command(
    settings: Settings,
    name: str,
    command: Command | str,
    *,
    by: str = "cli",
    wait_s: float = 600.0,
    backend: Backend | None = None,
) -> RolloutRecord:
    """``promote``/``abort``/``rollback`` the active rollout of ``name``.

    A live controller gets the command through the rollout's history and acts
    on it within a second; this waits (up to ``wait_s``) for the rollout to end.
    If the controller is gone, the command is carried out here. ``rollback``
    with no active rollout rolls production back to ``previous`` (in place).
    """
    cmd = Command(command)
    reg = Registry.from_settings(settings)
    active = reg.active_rollout(name)
    if active is None:
        if cmd != Command.ROLLBACK:
            raise NotFoundError(f"no rollout of {name!r} is running", hint=f"See `rayloop status {name}`.")
        prev = reg.get_alias(name, PREVIOUS)
        if prev is None:
            raise NotFoundError(
                f"{name!r} has no 'previous' version to roll back to",
                hint=f"Deploy an older version explicitly: `rayloop deploy {name}@VERSION`.",
            )
        return deploy(settings, f"{name}@{prev}", Strategy.ROLLING, interval_s=1.0, backend=backend)  # was production
    if not owner_alive(active, lease=reg.lease(active.id)):
        out = reconcile(settings, name, backend=backend, intent=cmd, actor=by)
        assert out.rollout is not None  # an active rollout is always finished one way or the other
        return out.rollout
    reg.update_rollout(active.id, event={"event": "command", "command": cmd.value, "by": by})
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        rec = reg.rollout(active.id)
        if not rec.active:
            return rec
        time.sleep(0.5)
    raise RolloutError(
        f"rollout {active.id} did not end within {wait_s:.0f}s of the {cmd.value} command",
        hint=f"Its controller ({active.owner}) may be stuck; `rayloop status --reconcile` takes over once it is gone.",
    )


def undeploy(settings: Settings, name: str, *, backend: Backend | None = None) -> dict[str, Any]:
    """Stop serving ``name``: delete its Serve app and forget its deployments (versions and aliases stay).

    Refused while a rollout of ``name`` runs (abort it first); a no-op when nothing is deployed.
    """
    from rayloop.rollout.backend import ServeBackend

    reg = Registry.from_settings(settings)
    active = reg.active_rollout(name)
    if active is not None:
        raise RolloutInProgressError(
            f"rollout {active.id} of {name!r} is running; undeploying now would leave it without an app",
            hint=f"Stop it first: `rayloop abort {name}`.",
        )
    be = backend or _default_backend(settings, start_local=False)
    be.select(name)
    current = be.read()
    if current is not None and current.model != name:
        raise RolloutError(
            f"Serve app {be.app_name!r} serves model {current.model!r}, not {name!r}",
            hint="Set serving.app_name to the app that serves it.",
        )
    removed = False
    if current is not None:
        if not isinstance(be, ServeBackend):
            raise RolloutError("undeploy needs the live Serve backend")
        removed = be.control.remove(be.app_name)
    for dep in reg.deployments(name):
        reg.unmark_deployed(name, dep["slot"], dep["app"])
    return {"model": name, "app": be.app_name, "removed": removed}


def rollout_history(settings: Settings, name: str | None = None, *, limit: int = 20) -> list[dict[str, Any]]:
    """The last ``limit`` rollouts (of ``name``, or of every model), newest first, as summaries."""
    reg = Registry.from_settings(settings)
    names = [name] if name else reg.list_models()
    records = sorted((r for n in names for r in reg.rollouts(n)), key=lambda r: r.id, reverse=True)
    return [_summary(r) for r in records[:limit]]


def rollout_record(settings: Settings, rid: int) -> RolloutRecord:
    """One rollout with its whole timeline (``history``)."""
    return Registry.from_settings(settings).rollout(rid)


def status(
    settings: Settings, name: str | None = None, *, backend: Backend | None = None, window_s: float = 60.0
) -> dict[str, Any]:
    """Versions, aliases, slots, weights, the active rollout and live per-slot metrics."""
    reg = Registry.from_settings(settings)
    names = [name] if name else reg.list_models()
    be = backend
    app: AppState | None = None
    app_error: str | None = None
    live: dict[str, Any] = {}
    placement: dict[str, Any] = {}
    try:
        be = be or _default_backend(settings, start_local=False)
        if name is not None:
            be.select(name)
        app = be.read()
        if app is not None:
            now = time.time()
            live = {k: v.summary() for k, v in be.window(now - window_s).items()}
            if app.slots.get(SHADOW) is not None:
                live["shadow_pairs"] = be.shadow_window(now - window_s)
            from rayloop.rollout.backend import ServeBackend
            from rayloop.serving.control import ServeControl

            if isinstance(be, ServeBackend) and isinstance(be.control, ServeControl):
                placement = be.control.placement(be.app_name)
    except Exception as e:  # status must work without a cluster
        app_error = f"{type(e).__name__}: {e}"
    capture: dict[str, Any] | None = None
    try:
        import ray

        if ray.is_initialized():
            from rayloop.data.capture import writer_stats

            capture = writer_stats(settings)
    except Exception as e:
        capture = {"error": f"{type(e).__name__}: {e}"}
    models: dict[str, Any] = {}
    for n in names:
        active = reg.active_rollout(n)
        past = reg.rollouts(n)
        last = next((r for r in past if not r.active), None)
        models[n] = {
            "aliases": reg.aliases(n),
            "deployments": reg.deployments(n),
            "active_rollout": None
            if active is None
            else _summary(active, alive=owner_alive(active, lease=reg.lease(active.id))),
            "last_rollout": None if last is None else _summary(last),
        }
    return {
        "app": None if be is None else be.app_name,
        "serve": None if app is None else app.summary(),
        "serve_error": app_error,
        "live_window_s": window_s,
        "live": live,
        "replicas": placement,
        "capture": capture,
        "models": models,
    }


def _summary(r: RolloutRecord, alive: bool | None = None) -> dict[str, Any]:
    st = r.state
    out: dict[str, Any] = {
        "id": r.id,
        "name": r.name,
        "strategy": r.strategy,
        "from_version": r.from_version,
        "to_version": r.to_version,
        "status": r.status,
        "phase": st.phase.value,
        "step": st.step,
        "percent": st.percent,
        "reason": st.reason,
        "started_at": r.started_at,
        "ended_at": r.ended_at,
        "owner": r.owner,
    }
    if alive is not None:
        out["owner_alive"] = alive
    return out
