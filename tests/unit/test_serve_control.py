"""The Serve seam's read-modify-apply holds one lock in the registry database, across processes."""

from __future__ import annotations

import json
import multiprocessing
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from rayloop.config import Settings
from rayloop.errors import LeaseLostError
from rayloop.serving.control import ServeControl


class _FileServe(ServeControl):
    """ServeControl whose 'Serve' is a JSON file of app configs (the lock is the real one unless replaced)."""

    def __init__(self, settings: Settings, path: Path, **kw: Any) -> None:
        super().__init__(settings, url="", **kw)  # url="" is not None: never look for a dashboard
        self.path = path

    def apps(self) -> list[dict[str, Any]]:
        return json.loads(self.path.read_text()) if self.path.exists() else []

    def prepare(self, apps: list[dict[str, Any]]) -> dict[str, Any]:
        return {"applications": apps}

    def put(self, doc: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(doc["applications"]))


def _deploy_one(home: str, path: str, name: str, both_read: Any) -> None:
    settings = Settings.model_validate({"home": home})
    kw = {"lock": nullcontext} if both_read is not None else {}
    control = _FileServe(settings, Path(path), **kw)

    def build(mine: dict[str, Any] | None) -> dict[str, Any]:
        if both_read is not None:
            both_read.wait(timeout=30)  # without the lock: both have read before either applies
        else:
            time.sleep(0.3)  # with it: a slow read-modify-apply the other must wait for
        return {"name": name, "import_path": "x:y"}

    control.update(name, build)


def _race(tmp_path: Path, local_lock_only: bool) -> set[str]:
    path = tmp_path / "serve.json"
    ctx = multiprocessing.get_context("fork")
    both_read = ctx.Barrier(2) if local_lock_only else None
    procs = [
        ctx.Process(target=_deploy_one, args=(str(tmp_path / "home"), str(path), f"app-{i}", both_read))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return {a["name"] for a in json.loads(path.read_text())}


def test_two_controllers_never_lose_each_others_app(tmp_path: Path) -> None:
    assert _race(tmp_path, local_lock_only=False) == {"app-0", "app-1"}


def test_without_the_database_lock_one_change_is_lost(tmp_path: Path) -> None:
    """The race the lock prevents is real: the same two updates without it keep only one app."""
    assert len(_race(tmp_path, local_lock_only=True)) == 1


def test_serve_progress_names_each_deployment_and_its_replica_states() -> None:
    from types import SimpleNamespace

    from rayloop.serving.control import describe_status

    st = SimpleNamespace(
        status="DEPLOYING",
        deployments={
            "llm-stable": SimpleNamespace(status="UPDATING", replica_states={"RUNNING": 1, "STARTING": 1}),
            "llm-canary": SimpleNamespace(status="HEALTHY", replica_states={"RUNNING": 0}),
        },
    )
    assert describe_status(st) == "DEPLOYING; llm-canary: HEALTHY; llm-stable: UPDATING (1 running, 1 starting)"


class _Held:
    """A lock whose checks pass until ``lose_after`` of them ran (the holder froze and lost it meanwhile)."""

    def __init__(self, lose_after: int) -> None:
        self.checks, self.lose_after = 0, lose_after

    def check(self) -> None:
        self.checks += 1
        if self.checks > self.lose_after:
            raise LeaseLostError("lock 'serve-config' is no longer ours (token 1): held by B (token 2)")


def test_a_config_that_went_out_after_the_lock_was_lost_is_reported_as_stale(tmp_path: Path) -> None:
    settings = Settings.model_validate({"home": str(tmp_path / "home")})
    path = tmp_path / "serve.json"
    build = lambda mine: {"name": "a", "import_path": "x:y"}  # noqa: E731

    # Lost before the apply: nothing goes out.
    held = _Held(lose_after=0)
    with pytest.raises(LeaseLostError) as e:
        _FileServe(settings, path, lock=lambda: nullcontext(held)).update("a", build)
    assert not e.value.stale_apply and not path.exists()
    # Lost between the last check and the apply (a freeze there): it went out, and the caller is told so.
    held = _Held(lose_after=1)
    with pytest.raises(LeaseLostError) as e:
        _FileServe(settings, path, lock=lambda: nullcontext(held)).update("a", build)
    assert e.value.stale_apply and "went out after the lock was lost" in str(e.value)
    assert [a["name"] for a in json.loads(path.read_text())] == ["a"] and held.checks == 2


def test_remove_returns_once_serve_has_stopped_the_app(tmp_path: Path) -> None:
    """`rayloop undeploy` must not return while the app's replicas still answer (they drain for a while)."""

    class Draining(_FileServe):
        polls = 0

        def _details(self) -> dict[str, Any]:
            Draining.polls += 1
            names = {a["name"] for a in self.apps()}
            if Draining.polls <= 2:
                names.add("other")  # Serve lists it as DELETING while its replicas stop
            return {"applications": {n: {"status": "DELETING"} for n in names}}

    path = tmp_path / "serve.json"
    path.write_text(json.dumps([{"name": "rayloop", "import_path": "x:y"}, {"name": "other", "import_path": "x:y"}]))
    control = Draining(Settings.model_validate({"home": str(tmp_path / "home")}), path, lock=nullcontext)
    assert control.remove("other") is True
    assert Draining.polls == 3, "it waited until Serve no longer listed the app"
    assert [a["name"] for a in control.apps()] == ["rayloop"]
    assert control.remove("gone") is False


def test_replica_placement_reads_node_and_state_per_slot_from_serves_details() -> None:
    from rayloop.serving.control import replica_placement

    def rep(rid: str, state: str, node: str) -> dict[str, Any]:
        return {"replica_id": rid, "state": state, "node_id": node, "node_ip": f"10.0.0.{node[-1]}", "pid": 1}

    details = {
        "applications": {
            "rayloop": {
                "deployments": {
                    "llm-stable": {"replicas": [rep("a", "RUNNING", "n1"), rep("b", "STARTING", "n2")]},
                    "llm-canary": {"replicas": [rep("c", "RUNNING", "n2")]},
                }
            },
            "other": {"deployments": {"llm-stable": {"replicas": [rep("x", "RUNNING", "n3")]}}},
        }
    }
    placed = replica_placement(details, "rayloop")
    assert placed["stable"] == [
        {"replica": "a", "state": "RUNNING", "node_id": "n1", "node_ip": "10.0.0.1"},
        {"replica": "b", "state": "STARTING", "node_id": "n2", "node_ip": "10.0.0.2"},
    ]
    assert [r["replica"] for r in placed["canary"]] == ["c"] and placed["shadow"] == []
    assert replica_placement(details, "missing") == {"stable": [], "canary": [], "shadow": []}
    assert replica_placement({}, "rayloop") == {"stable": [], "canary": [], "shadow": []}


def test_unplaced_replicas_are_those_of_the_given_slots_without_a_node() -> None:
    from rayloop.serving.control import unplaced_replicas

    def rep(name: str, state: str, node: str | None) -> dict[str, Any]:
        return {"replica_id": name, "actor_name": f"SERVE_REPLICA::rayloop#{name}", "state": state, "node_id": node}

    details = {
        "applications": {
            "rayloop": {
                "deployments": {
                    "llm-stable": {"replicas": [rep("s1", "RUNNING", "n1"), rep("s2", "STARTING", None)]},
                    "llm-canary": {"replicas": [rep("c1", "STOPPING", "n1"), rep("c2", "STOPPING", None)]},
                    "llm-shadow": {"replicas": [rep("h1", "STARTING", "")]},
                }
            },
            "other": {"deployments": {"llm-canary": {"replicas": [rep("x", "STOPPING", None)]}}},
        }
    }
    assert unplaced_replicas(details, "rayloop", frozenset({"canary"})) == {"SERVE_REPLICA::rayloop#c2": "STOPPING"}
    assert unplaced_replicas(details, "rayloop", frozenset({"canary", "shadow"})) == {
        "SERVE_REPLICA::rayloop#c2": "STOPPING",
        "SERVE_REPLICA::rayloop#h1": "STARTING",
    }
    assert unplaced_replicas(details, "missing", frozenset({"canary"})) == {}


def test_cancel_unplaced_stops_only_replicas_serve_is_stopping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A released slot's replica that never got a node is killed at once once Serve is stopping it; one that
    Serve still starts (it may want it) is waited for a moment, never killed. Serve's controller gives states as
    ``ReplicaState`` members (without a dashboard URL the details come from it), its REST API as strings."""
    import ray
    from ray.serve._private.common import ReplicaState

    states: list[dict[str, Any]] = [
        {"c2": ReplicaState.STARTING, "c3": "STARTING"},  # Serve has not applied the release yet
        {"c2": ReplicaState.STOPPING, "c3": "STARTING"},
        {"c2": ReplicaState.STOPPING, "c3": "STOPPING"},
    ]

    class Control(ServeControl):
        calls = 0

        def _details(self) -> dict[str, Any]:
            now = states[min(Control.calls, len(states) - 1)]
            Control.calls += 1
            reps = [{"actor_name": n, "state": s, "node_id": None} for n, s in now.items()]
            return {"applications": {"rayloop": {"deployments": {"llm-canary": {"replicas": reps}}}}}

    killed: list[str] = []
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace=None: name)
    monkeypatch.setattr(ray, "kill", lambda handle, no_restart=True: killed.append(handle))
    control = Control(Settings.model_validate({"home": str(tmp_path / "home")}), url=None, lock=nullcontext)
    assert control.cancel_unplaced("rayloop", frozenset({"canary"}), settle_s=10) == ["c2", "c3"]
    assert killed == ["c2", "c3"] and Control.calls == 3

    # Nothing waits for room: one look, nothing killed.
    states[:] = [{}]
    Control.calls, killed[:] = 0, []
    assert control.cancel_unplaced("rayloop", frozenset({"canary"})) == [] and Control.calls == 1 and not killed
