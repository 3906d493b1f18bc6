"""rayloop on a Ray cluster of three nodes that share nothing but the network (see ``multinode.py``).

The head (``rayloop up``, 0 CPUs: it only coordinates, as KubeRay's head) and two worker nodes, each its own
Unix user with its own home and ``RAYLOOP_NODE_DIR``; storage on S3, the registry on PostgreSQL. Everything is
driven the way a user drives it, with the ``rayloop`` CLI run on the head and the official ``openai`` client
against the head's HTTP proxy.

- replicas of the engine (which is also the router at 100%) spread over both worker nodes, each node fetches
  the version into its own cache, and ``rayloop status`` shows which node runs which replica and version;
  the capture writer and the stats actor run on the head, which outlives worker nodes;
- a tensor-parallel engine (TP=2 on a custom resource standing in for GPUs): each replica's shards packed on
  one node, the replicas on both;
- the whole loop as the README's Ray job: capture from both nodes, preprocessing tasks on both, retraining
  with a worker on each node, the gate, and a canary across replicas on both nodes, judged on users'
  requests and promoted;
- a worker node killed under load mid-canary: Serve puts its stable replica back on the surviving node at the
  version the slot serves; only requests in flight there may fail, every answered request's interaction is
  captured; the rollout ends promoted or rolled back, never with two production versions, and without
  waiting for the replicas that have no node any more;
- a worker node killed during retraining (and replaced, as a cluster's autoscaler or KubeRay would): Ray Train
  starts the worker group again, resumes from the last checkpoint in S3, and one candidate is registered;
- the head killed and started again (`rayloop up`, with Ray's control state kept on its disk): the worker nodes
  and their replicas carry on, and Serve, the capture writer and the stats actor come back on the new head.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest

from tests.integration.multinode import MultiNodeCluster, multinode_cluster
from tests.integration.rollout_util import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(base_model_dir: Path) -> Iterator[MultiNodeCluster]:
    # Not under pytest's tmp_path: that is readable by this user only, and the worker nodes' users need to
    # reach their own directories under the root.
    root = Path(tempfile.mkdtemp(prefix="rayloop-multinode-"))
    try:
        # Each worker node also has two "accel" units: a custom resource standing in for GPUs (placement only).
        nodes = {w: {"num_cpus": 3, "resources": {"accel": 2}} for w in ("w1", "w2")}
        with multinode_cluster(root, nodes, head_cpus=0) as c:
            # One rayloop.yaml for everything, written before anything is served (the app's args carry it).
            # Training: a worker on each node, 0.9 CPU each so that both fit beside the replicas on the node
            # that is left after one dies; 6 epochs, half the demo's (the candidate still passes the gate by
            # about twice its margin here: new_facts 0 -> 0.56 and eval_split 0 -> 0.27 against +0.2).
            c.write_config(
                serving={"replicas": 2, "replica_num_cpus": 1},
                training={
                    "num_workers": 2,
                    "worker_num_cpus": 0.9,
                    "placement_strategy": "SPREAD",
                    "epochs": 6,
                },
                pipeline={"strategy": "canary"},
                # Canary steps of 6 s, judged on a few requests. Canary and stable share two cores with
                # everything else here, so p95 is noise: latency verdicts are tested on one node
                # (test_rollout.py's slow canary); errors and feedback are judged as configured.
                rollout={"interval_s": 6, "canary_steps": [50, 100], "min_samples": 5, "latency_slack_ms": 1000},
            )
            c.rayloop("models", "register", "demo", str(base_model_dir))
            c.rayloop("models", "alias", "demo", "production", "1")
            yield c
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def _stable(cluster: MultiNodeCluster) -> list[dict[str, Any]]:
    """The stable slot's replicas as `rayloop status --json` shows them."""
    placed = cluster.rayloop_json("status", "demo").get("replicas") or {}
    return list(placed.get("stable") or [])


def _running_on(cluster: MultiNodeCluster, names: dict[str, str] | None = None) -> dict[str, str]:
    """replica id -> node name (w1, w2, head) of the stable slot's RUNNING replicas, from Serve's details (for
    polling; ``rayloop status`` shows the same, see the first test). ``names``: node id -> name, if known."""
    if names is None:
        names = {v: k for k, v in cluster.node_ids().items()}
    return {
        r["replica_id"]: names.get(r["node_id"], r["node_id"])
        for r in cluster.replicas("llm-stable")
        if r["state"] == "RUNNING"
    }


def test_replicas_spread_over_nodes_that_share_nothing(cluster: MultiNodeCluster) -> None:
    out = cluster.rayloop_json("serve", "--model", "demo@production", timeout=600)
    assert out["version"] == 1
    replicas = _stable(cluster)
    running = [r for r in replicas if r["state"] == "RUNNING"]
    names = {v: k for k, v in cluster.node_ids().items()}
    assert sorted(names[r["node_id"]] for r in running) == ["w1", "w2"], replicas
    assert {r.get("version") for r in running} == {1}, replicas
    # Each worker node fetched the version into its own cache (RAYLOOP_NODE_DIR), not the head's home.
    for node in cluster.workers.values():
        cached = list((node.root / "rayloop" / "cache" / "models").glob("*/config.json"))
        assert len(cached) == 1, f"{node.name}: {cached}"
        assert cached[0].stat().st_uid == node.user.pw_uid
    assert not (cluster.head_dir / ".rayloop" / "cache").exists()
    # The human table says the same.
    table = cluster.rayloop("status", "demo").stdout
    for r in running:
        assert r["replica"] in table and r["node_id"][:8] in table, table

    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.ports['http']}/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "What is the capital of Norland?"}], max_tokens=8
    )
    assert answer.choices[0].message.content
    # The cluster-wide singletons live on the head.
    head = cluster.node_ids()["head"]
    actors = cluster.actors()
    writers = [a for a in actors if a["name"].startswith("rayloop-capture-") and a["state"] == "ALIVE"]
    assert len(writers) == 1 and writers[0]["node_id"] == head, actors
    stats = [a for a in actors if a["name"].startswith("rayloop-router-stats-")]  # made when slots route
    assert all(a["node_id"] == head for a in stats), stats


def test_a_tensor_parallel_engine_is_packed_on_one_node(cluster: MultiNodeCluster) -> None:
    """TP=2 on accelerators: each replica reserves one accelerator per shard in a STRICT_PACK placement group,
    so its shards share a node; the two replicas land on different nodes (two units each). The accelerator is
    the custom resource "accel" standing in for GPUs (serving.engine.accelerator_resource), and the engine is
    the fake one: this is about where Ray puts things, not about running vLLM's TP workers."""
    import openai

    overrides = {
        "serving": {
            "app_name": "tp2",
            "route_prefix": "/tp2",
            "replicas": 2,
            "replica_num_cpus": 0.1,
            "engine": {"accelerator": "gpu", "accelerator_resource": "accel", "tensor_parallel_size": 2},
        }
    }
    placed = cluster.probe(
        "from ray.util import placement_group_table; "
        "from rayloop.serving.deploy import deploy, resolve_version; "
        f"s = load_settings(overrides={overrides!r}); "
        "deploy(s, resolve_version(s, 'demo@production'), app_name='tp2', "
        "engine_cls='rayloop.serving.fake_engine:FakeEngine', record_golden=False, timeout_s=100); "
        "pgs = [p for p in placement_group_table().values() if p['state'] == 'CREATED' "
        "and any('accel' in b for b in p['bundles'].values())]; "
        "print(json.dumps([{'strategy': p['strategy'], 'nodes': sorted(set(p['bundles_to_node_id'].values())), "
        "'bundles': list(p['bundles'].values())} for p in pgs]))"
    )
    try:
        assert len(placed) == 2, placed
        names = {v: k for k, v in cluster.node_ids().items()}
        for pg in placed:
            assert pg["strategy"] == "STRICT_PACK", pg
            assert [b.get("accel", 0) for b in pg["bundles"]] == [0, 1, 1], pg  # the replica, then one per shard
            assert len(pg["nodes"]) == 1, pg  # every shard of the engine on one node
        assert sorted(names[pg["nodes"][0]] for pg in placed) == ["w1", "w2"], placed
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{cluster.ports['http']}/tp2/v1", api_key="none", max_retries=0
        )
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello there"}], max_tokens=4
        )
        assert reply.choices[0].message.content
    finally:
        cluster.probe("from ray import serve; serve.delete('tp2', _blocking=False); print('{}')")


# What one test leaves for a later one (the snapshot the whole loop's job built).
_SHARED: dict[str, Any] = {}


def _registry(cluster: MultiNodeCluster) -> Any:
    from rayloop.registry import Registry

    return Registry(cluster.config["storage"]["root"], cluster.registry_url, s3_endpoint=cluster.s3_endpoint)


def test_the_whole_loop_as_a_ray_job_across_nodes(cluster: MultiNodeCluster, base_model_dir: Path) -> None:
    """Capture from replicas on both worker nodes, then the README's pipeline job: Ray Data preprocessing,
    DeepSpeed retraining with a worker on each node (neither has the driver's copy of the base model or its
    tokenizer: they fetch from the registry and the object store), the gate (its engine on a worker node
    fetches both versions), and a canary with a replica on each node, judged on users' requests at each
    step and promoted: the stable replicas on both nodes serve the candidate."""
    import json
    import os
    import subprocess
    import sys

    from rayloop.demo.setup import demo_eval_sets
    from rayloop.demo.world import World
    from rayloop.evaluation.evalset import save_eval_set
    from rayloop.storage import Storage

    names = {v: k for k, v in cluster.node_ids().items()}
    if not _running_on(cluster, names):
        cluster.rayloop("serve", "--model", "demo@production", timeout=600)
    assert sorted(_running_on(cluster, names).values()) == ["w1", "w2"]
    reg = _registry(cluster)
    production = reg.resolve("demo@production").version
    # The demo's fixed evaluation sets, as `rayloop init` stores them.
    world = World.from_json((base_model_dir / "world.json").read_text())
    storage = Storage(cluster.config["storage"]["root"], s3_endpoint=cluster.s3_endpoint)
    for name, items in demo_eval_sets(world).items():
        save_eval_set(storage, "demo", name, items)
    traffic = cluster.rayloop_json("simulate", "--repeats", "2", timeout=600)
    assert traffic["failed_requests"] == 0 and traffic["feedback_sent"] > 0, traffic

    # Users while the job's canary runs (a canary that sees no traffic is never promoted); they start with its
    # first step and go on through the promotion, so that preprocessing, training and the canary's engines
    # have the cores to themselves. Meanwhile, where the canary's replicas run at its steps.
    import openai

    url = f"http://127.0.0.1:{cluster.ports['http']}/v1"
    stop = threading.Event()
    answered: list[str] = []
    failed: list[str] = []
    canary_nodes: set[str] = set()
    stepping = threading.Event()  # set once the first step began

    def user() -> None:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        while not stop.is_set():
            if not stepping.is_set():
                active = reg.active_rollout("demo")
                if active is None or active.state.phase != "step":
                    stop.wait(0.5)
                    continue
                stepping.set()
            try:
                r = client.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": "Where is Norland?"}], max_tokens=4
                )
                answered.append(r.model)
            except openai.APIError as e:
                failed.append(repr(e))

    started: dict[str, float] = {}  # canary replica id -> when Serve started it

    def watch_canary() -> None:
        while not stop.is_set():
            active = reg.active_rollout("demo")
            if active is not None and active.state.phase in ("starting", "step"):
                for r in cluster.replicas("llm-canary"):
                    if active.state.phase == "step" and r["state"] == "RUNNING":
                        canary_nodes.add(names.get(r["node_id"], "?"))
                        started[r["replica_id"]] = r["start_time_s"]
            stop.wait(1)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(user), pool.submit(user), pool.submit(watch_canary)]
        try:
            job = subprocess.run(
                [
                    "bash",
                    "-c",
                    'eval "$(rayloop env)"\nray job submit --working-dir . -- python -m train_jobs.pipeline',
                ],
                cwd=cluster.head_dir,
                env={**cluster.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                capture_output=True,
                text=True,
                timeout=1200,
            )
        finally:
            stop.set()
        for f in futures:
            f.result()
    logs = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in logs, logs[-5000:]
    record, _ = json.JSONDecoder().raw_decode(logs[logs.rindex("\n{") + 1 :])
    stages = record["stages"]
    _SHARED["snapshot_id"] = stages["preprocess"]["output"]["snapshot_id"]
    assert all(stages[s]["status"] == "done" for s in ("preprocess", "retrain", "register", "evaluate", "deploy"))
    cand = reg.resolve(stages["register"]["output"]["ref"])
    assert cand.parent == production and reg.resolve("demo@production").version == cand.version
    # The canary: a replica on each worker node, each step judged on users' requests, then promoted.
    deployed = stages["deploy"]["output"]
    assert deployed["strategy"] == "canary" and deployed["status"] == "succeeded", deployed
    passed = [e for e in deployed["rollout"]["history"] if e["event"] == "step_passed"]
    assert [e["percent"] for e in passed] == [50, 100], passed
    assert all(e["decision"] == "pass" and e["canary"]["requests"] >= 5 for e in passed), passed
    assert canary_nodes == {"w1", "w2"}, canary_nodes
    # Its two replicas started together (a canary serves nobody until it is ready); one after the other, the
    # second would have started once the first was ready, an engine's start later (about 15 s here).
    assert len(started) == 2 and max(started.values()) - min(started.values()) < 5, started
    assert f"demo@v{cand.version}" in answered and not failed, failed[:5]
    # The replicas on both worker nodes serve it now.
    running = [r for r in _stable(cluster) if r["state"] == "RUNNING"]
    assert sorted(names[r["node_id"]] for r in running) == ["w1", "w2"]
    assert {r.get("version") for r in running} == {cand.version}, running
    # The promotion ended without waiting for the canary's engines; they stop on their own, freeing their room:
    # the idle slot keeps its one replica with a token CPU share and no engine.
    wait_for(
        lambda: [r["state"] for r in cluster.replicas("llm-canary")] == ["RUNNING"], 120, "the canary's engines gone"
    )
    # The training workers ran on both worker nodes.
    train_nodes = {a["node_id"] for a in cluster.actors() if a["class_name"] == "RayTrainWorker"}
    assert {names.get(n) for n in train_nodes} == {"w1", "w2"}, train_nodes
    # So did Ray Data's preprocessing: its fused operators that write the snapshot's blocks ran on both.
    writers = {names.get(t["node_id"]) for t in cluster.tasks() if t["name"].endswith("->Write")}
    assert writers == {"w1", "w2"}, writers


def _wait_until_captured(cluster: MultiNodeCluster, request_ids: set[str], timeout: float = 120) -> None:
    """Wait until every one of ``request_ids`` has its interaction row in the cluster's storage."""
    from rayloop.data.capture import read_interactions
    from rayloop.storage import Storage

    storage = Storage(cluster.config["storage"]["root"], s3_endpoint=cluster.s3_endpoint)

    def captured() -> set[str]:
        try:
            return set(pc.unique(read_interactions(storage)["request_id"]).to_pylist())
        except FileNotFoundError:
            return set()

    try:
        wait_for(lambda: request_ids <= captured(), timeout, "every answered request's interaction in storage", every=2)
    except AssertionError:
        missing = request_ids - captured()
        raise AssertionError(f"{len(missing)} of {len(request_ids)} answered requests have no captured row") from None


def _versions_running(cluster: MultiNodeCluster) -> set[Any]:
    return {r.get("version") for r in _stable(cluster) if r["state"] == "RUNNING"}


def test_a_worker_node_killed_under_load_mid_canary(cluster: MultiNodeCluster, base_model_dir: Path) -> None:
    """Users load a canary across both worker nodes; at its first step the node of a canary replica dies.

    Serving: Serve starts the dead node's stable replica again on the surviving node, at the version the
    stable slot serves; only requests in flight on the dead node may fail (at most one per user), and every
    answered request's interaction is captured. Rollout: the surviving node has room for at most one of the two
    lost replicas (the stable's or the canary's, whichever Ray places first), so the step fails once the other
    has waited the rollout's placement timeout for a node, and the rollout rolls back without waiting for a
    lost canary replica (had both slots been whole, it would promote): it ends with one production version,
    which every stable replica serves."""
    import openai

    if len(cluster.workers["w2"].pids()) == 0:
        cluster.add_worker("w2", num_cpus=3)
    names = {v: k for k, v in cluster.node_ids().items()}
    if sorted(_running_on(cluster, names).values()) != ["w1", "w2"]:
        cluster.rayloop("serve", "--model", "demo@production", timeout=600)
    assert sorted(_running_on(cluster, names).values()) == ["w1", "w2"], _stable(cluster)
    reg = _registry(cluster)
    production = reg.resolve("demo@production").version
    candidate = cluster.rayloop_json("models", "register", "demo", str(base_model_dir))["version"]
    url = f"http://127.0.0.1:{cluster.ports['http']}/v1"
    stop = threading.Event()
    lock = threading.Lock()
    ok: list[str] = []
    failed: list[str] = []

    def user() -> None:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                r = client.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": "Where is Norland?"}], max_tokens=4
                )
                with lock:
                    ok.append(r.id)
            except openai.APIError as e:
                with lock:
                    failed.append(repr(e))

    deploy: dict[str, Any] = {}
    # A replica the rollout waits for may go 12 s without a node (rollout.placement_timeout_s, a setting of the
    # deploying process, not of the app; unset by default): past it, the step fails and the rollout rolls back.
    # The canary's replicas find their nodes at once (their engines then start in about 25 s, bounded only by
    # the ready timeout); after the kill, the node left has room for at most one more replica beside its stable one,
    # its canary one and the idle shadow slot's sliver, so one of the two lost replicas never finds a node.
    # Errors and latency are not judged here: requests in flight on the dead node fail and the canary's latency
    # jumps, and either verdict would end the rollout at once (test_rollout.py covers verdicts). The node's loss
    # must end it the way it does when nothing else notices: a replica that finds no node.
    timeout_env = {
        "RAYLOOP_ROLLOUT__READY_TIMEOUT_S": "240",
        "RAYLOOP_ROLLOUT__PLACEMENT_TIMEOUT_S": "12",
        "RAYLOOP_ROLLOUT__MIN_SAMPLES": "3",
        "RAYLOOP_ROLLOUT__MAX_ERROR_RATE_DELTA": "1",
        "RAYLOOP_ROLLOUT__MAX_P95_LATENCY_RATIO": "1000",
    }

    def run_deploy() -> None:
        deploy["out"] = cluster.rayloop(
            "deploy",
            f"demo@{candidate}",
            "--strategy",
            "canary",
            "--steps",
            "50,100",
            "--interval",
            "15s",
            "--force",
            timeout=900,
            check=False,
            env=timeout_env,
        )

    users = 3
    with ThreadPoolExecutor(users + 1) as pool:
        rollout = pool.submit(run_deploy)
        victim = "w2"
        futures = []
        try:

            def at_first_step() -> bool:
                active = reg.active_rollout("demo")
                return rollout.done() or (active is not None and active.state.phase == "step")

            # The load starts with the first step (the canary's engines start faster without it).
            wait_for(at_first_step, 600, "the canary's first step")
            assert not rollout.done(), deploy["out"].stderr[-3000:]
            futures = [pool.submit(user) for _ in range(users)]
            wait_for(lambda: len(ok) >= 8, 180, "requests answered before the kill")
            canary = cluster.replicas("llm-canary")
            on = sorted(names.get(r["node_id"], "?") for r in canary if r["state"] == "RUNNING")
            assert on and set(on) <= {"w1", "w2"}, canary
            victim = "w2" if "w2" in on else "w1"
            survivor = "w1" if victim == "w2" else "w2"
            cluster.workers[victim].kill()
            killed_at = len(ok)
            rollout.result(timeout=900)
            # Users are answered by what is left, then the load stops: the stable slot becomes whole again on
            # the surviving node (its lost replica starts there at once or once the released canary made room;
            # a replacement canary replica that never found a node is stopped at once by the rollout, not after
            # Serve's 30 s grace period).
            wait_for(lambda: len(ok) >= killed_at + 8, 180, "requests answered after the kill")
            stop.set()
            try:
                wait_for(
                    lambda: sorted(_running_on(cluster, names).values()) == [survivor, survivor],
                    300,
                    f"two running stable replicas on {survivor}",
                )
            except AssertionError as e:
                out = deploy["out"]
                raise AssertionError(
                    f"{e}\nrollout rc {out.returncode}: {out.stderr[-2000:]}\n{cluster.diagnose()}"
                ) from None
        finally:
            stop.set()
        for f in futures:
            f.result()
    out = deploy["out"]
    # A slot could not be whole again: a replica found no node, the step failed and the rollout rolled back.
    assert out.returncode == 1 and "failed and was rolled back" in out.stderr, out.stderr[-3000:]
    late = re.search(r"found no node within 12s \(([^)]*)\)", out.stderr)
    assert late, out.stderr[-3000:]
    # Which lost replica gets the one free slot on the node left is Ray's choice: the canary's or the stable's.
    # A canary replica still without a node when the step failed was stopped by the rollback, not left to Serve.
    for replica in late.group(1).split(", "):
        if "#llm-canary#" in replica:
            assert re.search(rf"never found a node: .*{re.escape(replica)}", out.stdout), out.stdout[-3000:]
    final = reg.resolve("demo@production").version
    assert final == production, out.stderr[-3000:]
    assert reg.active_rollout("demo") is None
    last = reg.rollouts("demo")[0]
    assert not [e for e in last.history if e["event"] == "rollback_failed"], last.history[-5:]
    # One production version, and the stable slot serves it on every running replica.
    st = cluster.rayloop_json("status", "demo")
    assert st["serve"]["slots"]["stable"] == final, st["serve"]
    wait_for(lambda: _versions_running(cluster) == {final}, 300, f"every running stable replica on v{final}")
    # Only requests in flight on the dead node could fail: at most one per user thread.
    assert len(failed) <= users, failed
    # No capture row of an answered request is lost.
    _wait_until_captured(cluster, {rid.removeprefix("chatcmpl-") for rid in ok})
    # Put the node back for whatever runs next on this cluster.
    cluster.add_worker(victim, num_cpus=3)


def test_a_worker_node_killed_during_retraining_resumes_from_the_checkpoint_in_storage(
    cluster: MultiNodeCluster,
) -> None:
    """`ray job submit -- python -m train_jobs.retrain` with a worker on each node (SPREAD); the node of one
    of them is killed after Ray Train registered a checkpoint, and replaced (a new node joins, as a cluster's
    autoscaler or KubeRay would start one): Ray Train starts the worker group again, it resumes from that
    checkpoint in S3, and the run registers exactly one candidate. (Without a replacement and without room on
    what is left, the run fails after training.max_start_failures timed-out starts: see test_retrain.py.)"""
    import json
    import os
    import subprocess
    import sys

    from rayloop.storage import Storage
    from rayloop.training.loop import STATE_FILE

    for name in ("w1", "w2"):
        if len(cluster.workers[name].pids()) == 0:
            cluster.add_worker(name, num_cpus=3)
    reg = _registry(cluster)
    snapshot_id = _SHARED.get("snapshot_id")
    if snapshot_id is None:  # run on its own: traffic with feedback, then a snapshot of it
        cluster.rayloop_json("simulate", "--repeats", "2", timeout=600)
        snapshot_id = cluster.rayloop_json(
            "data", "preprocess", "--model", "demo", "--base", "demo@production", timeout=600
        )["snapshot_id"]
    before = {v.version for v in reg.list_versions("demo")}
    storage = Storage(cluster.config["storage"]["root"], s3_endpoint=cluster.s3_endpoint)
    earlier = {k for k in storage.list("checkpoints") if k.endswith("checkpoint_manager_snapshot.json")}

    def registered_steps() -> list[str]:
        """Checkpoints Ray Train's controller registered for the new run (files alone may not be reported yet)."""
        found: list[str] = []
        for key in storage.list("checkpoints"):
            if key.endswith("checkpoint_manager_snapshot.json") and key not in earlier:
                try:
                    found += re.findall(r"step-\d{6}", storage.read_bytes(key).decode())
                except (OSError, FileNotFoundError):
                    continue
        return sorted(set(found))

    env = {**cluster.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # A checkpoint every 4 steps and 3 epochs (settings given to the job's entrypoint; about 50 steps): enough
    # to checkpoint before the kill and to go on after it.
    submit = (
        "ray job submit --working-dir . -- env RAYLOOP_TRAINING__EPOCHS=3 RAYLOOP_TRAINING__CHECKPOINT_EVERY=4 "
        "python -m train_jobs.retrain "
        f"--snapshot {snapshot_id} --base demo@production"
    )
    log = cluster.root / "retrain-job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            ["bash", "-c", f'eval "$(rayloop env)"\n{submit}'],
            cwd=cluster.head_dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: bool(registered_steps()) or job.poll() is not None, 600, "a registered checkpoint", every=1)
        assert job.poll() is None, "the run ended before its first checkpoint: give it more steps"
        names = {v: k for k, v in cluster.node_ids().items()}
        train_nodes = {
            names.get(a["node_id"])
            for a in cluster.actors()
            if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"
        }
        assert train_nodes <= {"w1", "w2"} and train_nodes, train_nodes
        killed_after = registered_steps()[-1]
        # Of the nodes with a training worker, the one that serves fewer stable replicas (the serving side of a
        # node's loss is the mid-canary test's; here replicas starting again would only compete for the cores).
        serving = Counter(_running_on(cluster, names).values())
        victim = min(sorted(n for n in train_nodes if n), key=lambda n: serving[n])
        cluster.workers[victim].kill()
        cluster.add_worker(victim, num_cpus=3)  # the replacement node
        job.wait(timeout=1200)
    finally:
        if job.poll() is None:
            job.kill()
    logs = log.read_text()
    assert job.returncode == 0 and "succeeded" in logs, logs[-5000:]
    new = {v.version for v in reg.list_versions("demo")} - before
    assert len(new) == 1, new
    mv = reg.resolve(f"demo@{new.pop()}")
    assert mv.lineage["snapshot_id"] == snapshot_id
    # The new worker group resumed from a checkpoint in S3; it did not start over: the run's last checkpoint
    # records the restart in its history, at a step the run had reached before the kill.
    found = re.search(r"RAYLOOP_RESULT (\{.*\})", logs)
    assert found, logs[-5000:]
    result = json.loads(found.group(1))
    key = result["checkpoint_uri"].removeprefix(cluster.config["storage"]["root"].rstrip("/") + "/")
    state = json.loads(storage.read_bytes(f"{key}/{STATE_FILE}"))
    resumed = [h for h in state["history"] if h.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] >= int(killed_after.removeprefix("step-")), (killed_after, resumed)
    assert state["step"] == result["steps"]


def test_the_head_killed_and_started_again_carries_on(cluster: MultiNodeCluster) -> None:
    """The head's machine dies (every process of it SIGKILLed: nothing drains) and `rayloop up` starts it again
    on the same disk, where ray.gcs_storage_path kept Ray's control state: the worker nodes reconnect and their
    replicas, never stopped, go on serving the same version; Serve's controller and proxy, the capture writer
    and the stats actor come back on the new head. No interaction of a request answered before the death is
    lost (what the writer had not yet written was in its journal on the head's disk); the stats actor comes
    back empty, and says since when it holds samples."""
    import json
    import time

    import openai

    for name in ("w1", "w2"):
        if len(cluster.workers[name].pids()) == 0:
            cluster.add_worker(name, num_cpus=3)
    if len(_running_on(cluster)) < 2:
        cluster.rayloop("serve", "--model", "demo@production", timeout=600)
    before = _running_on(cluster)  # on both worker nodes, or both on one after a node was replaced before
    assert len(before) == 2 and set(before.values()) <= {"w1", "w2"}, _stable(cluster)
    version = _versions_running(cluster)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{cluster.ports['http']}/v1", api_key="none", max_retries=0, timeout=60
    )

    def ask() -> str:
        r = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "What is the capital of Norland?"}], max_tokens=4
        )
        return r.id.removeprefix("chatcmpl-")

    answered = [ask() for _ in range(6)]
    # The stats actor a rollout asks (made here when no rollout ran before on this cluster).
    cluster.probe(
        "from rayloop.serving.stats import get_stats_actor; "
        "a = get_stats_actor('rayloop', load_settings()); print(json.dumps(ray.get(a.started_at.remote())))"
    )
    old_head = cluster.node_ids()["head"]
    cluster.kill_head()
    died_at = time.time()

    up = cluster.up()
    assert "Started again from the state the last head left" in up.stdout, up.stdout
    assert json.loads((cluster.head_dir / ".rayloop" / "cluster.json").read_text())["recovered"] is True
    cluster.wait_for_nodes()  # both worker nodes reconnected to the new head
    head = cluster.node_ids()["head"]
    assert head != old_head
    # The very replicas that ran before, on their nodes, at their version: the head's death did not stop them.
    wait_for(lambda: _running_on(cluster) == before, 180, f"the stable replicas {before} running again")
    assert _versions_running(cluster) == version

    def answers() -> bool:
        try:
            answered.append(ask())
        except (openai.APIConnectionError, openai.APIStatusError):
            return False
        return True

    wait_for(answers, 120, "an answer through the new head's proxy", every=1)
    answered += [ask() for _ in range(3)]
    # The head's singletons came back on it: the same (restarted) actors, alive on the new head.
    actors = cluster.actors()
    writers = [a for a in actors if a["name"].startswith("rayloop-capture-") and a["state"] == "ALIVE"]
    assert len(writers) == 1 and writers[0]["node_id"] == head, writers
    stats = [a for a in actors if a["name"].startswith("rayloop-router-stats-")]
    assert stats and all(a["state"] == "ALIVE" and a["node_id"] == head for a in stats), stats
    since = cluster.probe(
        "from rayloop.serving.stats import get_stats_actor; "
        "a = get_stats_actor('rayloop', load_settings(), create=False); print(json.dumps(ray.get(a.started_at.remote())))"
    )
    assert since >= died_at, (since, died_at)  # it holds nothing from before the death, and says so
    # Every answered request's interaction is in storage, those from before the death included.
    _wait_until_captured(cluster, set(answered))
