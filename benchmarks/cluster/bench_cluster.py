"""Cluster benchmark on the 3-node harness (a head and two worker nodes, each its own Unix user; see
``tests/integration/multinode.py``): rolling a new version across replicas on two nodes in place vs
restarting them, with the requests that failed meanwhile, and serving throughput with the replicas on two
nodes vs on one node under the same load.

    flock /tmp/rayloop-heavy.lock .venv/bin/python benchmarks/cluster/bench_cluster.py --model DIR --out /tmp/cluster.json

Needs root (the harness creates the node users). ``DIR`` is an HF model directory (the demo base model:
``rayloop init``). All nodes share this machine's cores, so "two nodes vs one" measures what crossing
nodes costs (object transfers, routing between raylets), not added hardware. Side by side in one run:

- **in place vs restart**: ``rayloop deploy demo@2 --strategy rolling`` swaps the weights inside the running
  replicas; the baseline restarts the same replicas one at a time (Serve starts a new actor, its engine
  loads the version from the node's cache), as an upgrade without in-place swaps would. Both under the same
  steady load; every failed request is counted.
- **2 nodes vs 1**: the same closed-loop load with the two replicas on w1 and w2, then on w1 alone (w2
  stopped, Serve puts its replica on w1). Moving replicas between the sides takes minutes, so the sides do
  not alternate: each gets ``--rounds`` consecutive windows, and the JSON keeps every window's numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.integration.multinode import MultiNodeCluster, multinode_cluster  # noqa: E402


class Load:
    """``users`` closed-loop clients sending short chat completions until stopped; counts outcomes."""

    def __init__(self, url: str, users: int, tokens: int) -> None:
        self.url, self.users, self.tokens = url, users, tokens
        self.ok = 0
        self.failed: list[str] = []
        self.out_tokens = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _user(self, u: int) -> None:
        body = {
            "model": "demo",
            "messages": [{"role": "user", "content": f"Tell me about country number {u}."}],
            "max_tokens": self.tokens,
            "ignore_eos": True,
            "temperature": 0.0,
        }
        with httpx.Client(timeout=120) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(self.url + "/v1/chat/completions", json=body)
                    good = r.status_code == 200
                    detail = f"HTTP {r.status_code}"
                    n = r.json()["usage"]["completion_tokens"] if good else 0
                except httpx.HTTPError as e:
                    good, detail, n = False, type(e).__name__, 0
                with self._lock:
                    if good:
                        self.ok += 1
                        self.out_tokens += n
                    else:
                        self.failed.append(detail)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._user, args=(u,), daemon=True) for u in range(self.users)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)


def window(url: str, users: int, tokens: int, seconds: float) -> dict[str, Any]:
    with Load(url, users, tokens) as load:
        time.sleep(seconds)  # the measurement window itself, not a synchronisation
        t_ok, t_tok = load.ok, load.out_tokens
    return {"tok_s": t_tok / seconds, "requests": t_ok, "failed": len(load.failed)}


def stable_replicas(c: MultiNodeCluster) -> list[dict[str, Any]]:
    placed = c.rayloop_json("status", "demo").get("replicas") or {}
    return [r for r in placed.get("stable") or [] if r["state"] == "RUNNING"]


def wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def restart_replicas(c: MultiNodeCluster) -> float:
    """Restart the stable slot's replicas one at a time (a rolling restart); seconds until all serve again."""
    t0 = time.monotonic()
    for r in stable_replicas(c):
        actor = f"SERVE_REPLICA::{c.config['serving'].get('app_name', 'rayloop')}#llm-stable#{r['replica']}"
        c.probe(f"ray.kill(ray.get_actor({actor!r}, namespace='serve'), no_restart=True); print('{{}}')")
        wait(lambda r=r: r["replica"] not in {x["replica"] for x in stable_replicas(c)}, 120, "the old replica gone")
        wait(lambda: len(stable_replicas(c)) == 2, 600, "two running replicas again")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (the demo base model)")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="rayloop-bench-cluster-"))
    result: dict[str, Any] = {"users": args.users, "tokens": args.tokens, "seconds": args.seconds}
    try:
        with multinode_cluster(root, {"w1": {"num_cpus": 3}, "w2": {"num_cpus": 3}}, head_cpus=0) as c:
            c.write_config(serving={"replicas": 2, "replica_num_cpus": 1})
            models = root / "models"
            for v in (1, 2):
                d = models / f"v{v}"
                shutil.copytree(args.model, d)
                (d / "README.md").write_text(f"version {v}: same weights, its own fingerprint\n")
                c.rayloop("models", "register", "demo", str(d))
            c.rayloop("models", "alias", "demo", "production", "1")
            c.rayloop("serve", "--model", "demo@production", timeout=900)
            url = f"http://127.0.0.1:{c.ports['http']}"
            names = {v: k for k, v in c.node_ids().items()}
            result["placement_two_nodes"] = sorted(names[r["node_id"]] for r in stable_replicas(c))

            # In place vs restart, under the same load.
            with Load(url, args.users, args.tokens) as load:
                t0 = time.monotonic()
                # --interval 1s: the rolling upgrade's watch of the new version (30 s by default) is not part
                # of the swap; the restart baseline has none.
                c.rayloop(
                    "deploy", "demo@2", "--strategy", "rolling", "--interval", "1s", "--force", "--json", timeout=900
                )
                result["in_place_s"] = time.monotonic() - t0
                result["in_place_failed"] = len(load.failed)
                result["in_place_ok"] = load.ok
            with Load(url, args.users, args.tokens) as load:
                result["restart_s"] = restart_replicas(c)
                result["restart_failed"] = len(load.failed)
                result["restart_ok"] = load.ok
                result["restart_errors"] = sorted(set(load.failed))

            # Throughput: two nodes, then one.
            result["two_nodes"] = [window(url, args.users, args.tokens, args.seconds) for _ in range(args.rounds)]
            c.workers["w2"].stop()
            wait(
                lambda: sorted(names.get(r["node_id"], "?") for r in stable_replicas(c)) == ["w1", "w1"],
                600,
                "both on w1",
            )
            result["one_node"] = [window(url, args.users, args.tokens, args.seconds) for _ in range(args.rounds)]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    two = statistics.mean(w["tok_s"] for w in result["two_nodes"])
    one = statistics.mean(w["tok_s"] for w in result["one_node"])
    result["tok_s_two_nodes"], result["tok_s_one_node"], result["ratio_two_over_one"] = two, one, two / one
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    print(
        f"\n| | seconds | failed requests |\n| --- | --- | --- |\n"
        f"| roll v1 -> v2 in place (2 replicas, 2 nodes) | {result['in_place_s']:.1f} | {result['in_place_failed']} "
        f"of {result['in_place_ok'] + result['in_place_failed']} |\n"
        f"| restart the 2 replicas one at a time | {result['restart_s']:.1f} | {result['restart_failed']} "
        f"of {result['restart_ok'] + result['restart_failed']} |\n\n"
        f"tokens/s, {args.users} users: 2 nodes {two:.1f} vs 1 node {one:.1f} (ratio {two / one:.2f})"
    )


if __name__ == "__main__":
    main()
