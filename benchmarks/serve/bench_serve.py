"""Serving benchmark: rayloop on Ray Serve vs vLLM's own OpenAI server, same model, same client.

    flock /tmp/rayloop-heavy.lock nice -n -10 .venv/bin/python benchmarks/serve/bench_serve.py --model DIR

Both servers get the same engine settings (bf16, max_model_len 256, 1 GiB KV
cache, eager) and run side by side; one is loaded at a time. At each
concurrency the same asyncio client streams chat completions of exactly
``--tokens`` output tokens (``ignore_eos``) for ``--seconds``, alternating
vLLM and rayloop ``--rounds`` times: the shared VM's speed drifts by tens of
percent between minutes, and alternating puts both sides on the same drift.
Each ``--variants`` entry is a rayloop configuration redeployed against the
same vLLM server. Reports output tokens/s (mean of the rounds), TTFT p50/p99
(median of the rounds), messages per answer and the machine's memory growth
at each server's start. Then it times an in-place upgrade (weights swap +
golden check) against an engine rebuild with the new version. Prints JSON and
a Markdown table.

``--baseline-rev REV`` measures against rayloop at another commit instead of vLLM: that commit is checked
out in a temporary git worktree and served by its own Ray cluster beside this one (this script, copied into
the worktree, with ``--serve-only``), and the rounds alternate between the two. Before/after comparisons of
a change then share the VM's drift, as the vLLM comparison does:

    .venv/bin/python benchmarks/serve/bench_serve.py --model DIR --baseline-rev 2f38714 --variants default metrics-off
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class MemSampler:
    """Peak of the machine's used memory above the level at start (other load on the machine adds noise)."""

    def __init__(self) -> None:
        import psutil

        self._vm = psutil.virtual_memory
        self.base = self._vm().used
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._vm().used)
            time.sleep(0.2)

    def stop(self) -> float:
        self._stop.set()
        return (self.peak - self.base) / 2**30


async def _one(client: httpx.AsyncClient, url: str, model: str, tokens: int, i: int) -> tuple[float, int, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me about country number {i}."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
    }
    t0 = time.perf_counter()
    ttft = -1.0
    n = 0
    reads = 0  # body pieces as they arrived: how finely the server streamed

    async def lines(r: httpx.Response) -> Any:
        nonlocal reads
        buf = ""
        async for text in r.aiter_text():
            reads += 1
            buf += text
            *complete, buf = buf.split("\n")
            for line in complete:
                yield line
        if buf:
            yield buf

    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in lines(r):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                if ttft < 0:
                    ttft = time.perf_counter() - t0
                n += 1
    return ttft, n, reads


async def run_load(url: str, model: str, concurrency: int, seconds: float, tokens: int) -> dict[str, Any]:
    ttfts: list[float] = []
    chunks = 0
    requests = 0
    messages = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker(w: int) -> None:
            nonlocal chunks, requests, messages
            i = 0
            while time.perf_counter() < deadline:
                ttft, n, reads = await _one(client, url, model, tokens, w * 100000 + i)
                i += 1
                ttfts.append(ttft)
                chunks += n
                messages += reads
                requests += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ttfts.sort()
    return {
        "concurrency": concurrency,
        "requests": requests,
        "output_tok_s": requests * tokens / elapsed,
        "content_chunks": chunks,
        "messages": messages,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
    }


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not become ready")


VARIANTS: dict[str, dict[str, Any]] = {
    # rayloop's defaults: paced streams, the stable engine replicas answer HTTP themselves.
    "default": {},
    # One message per engine step.
    "pacing-off": {"stream_interval_ms": 0, "stream_messages_per_s": 0},
    # No interaction capture: what recording every request (write-ahead included) costs is default / this.
    "capture-off": {"capture": False},
    # Responses do not wait for the capture writer's acknowledgement (rows shipped every 0.5 s instead):
    # what serving.capture_ack's round trip costs is default / this.
    "capture-ack-off": {"capture_ack": False},
    # No metrics (rayloop's request metrics and vLLM's engine statistics): what monitoring costs.
    "metrics-off": {"metrics": False, "engine": {"log_stats": False}},
}


@contextlib.contextmanager
def rev_server(rev: str, model_dir: str, args: argparse.Namespace) -> Iterator[tuple[str, float, float]]:
    """rayloop at commit ``rev``, on a Ray cluster of its own: (url, start seconds, memory growth in GiB)."""
    port = 18733
    wt = Path(tempfile.mkdtemp(prefix="rl-bench-rev-")) / "wt"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), rev], check=True)
    script = wt / "benchmarks" / "serve" / "bench_serve.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, script)  # this script, importing rayloop from the worktree
    env = {**os.environ, "PYTHONPATH": str(wt), "RAY_AUTH_MODE": "disabled"}
    cmd = [
        sys.executable, str(script), "--serve-only", "--model", model_dir, "--port", str(port),
        "--engine-threads", str(args.engine_threads),
    ]  # fmt: skip
    mem = MemSampler()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=wt, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=600)
        start_s = time.monotonic() - t0
        time.sleep(3)
        yield url, start_s, mem.stop()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # --serve-only shuts its cluster down on EOF
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], check=False)


def serve_only(model_dir: str, port: int, args: argparse.Namespace) -> None:
    """Serve ``model_dir`` with this checkout's rayloop on ``port`` until standard input closes."""
    import ray
    from ray import serve

    from rayloop.serving.deploy import deploy, model_config_for_path

    home = tempfile.mkdtemp(prefix="rl-bench-base-")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = rayloop_settings(home, args, http_port=port)
        deploy(settings, model_config_for_path("demo", model_dir, 1), timeout_s=400)
        sys.stdin.read()
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def vllm_server(model_dir: str) -> Iterator[tuple[str, float, float]]:
    """vLLM's own OpenAI server: (url, start seconds, machine memory growth in GiB)."""
    port = 18731
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
        "--served-model-name", "demo", "--max-model-len", "256", "--dtype", "bfloat16", "--enforce-eager",
        "--max-num-seqs", "64", "--disable-log-stats", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    mem = MemSampler()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        start_s = time.monotonic() - t0
        time.sleep(3)
        yield url, start_s, mem.stop()
    finally:
        proc.terminate()
        proc.wait(60)


def rayloop_settings(home: str, args: argparse.Namespace, **serving: Any) -> Any:
    from rayloop.config import load_settings

    engine = {"kv_cache_gib": 1, "max_model_len": 256, "max_num_seqs": 64, "cpu_threads": args.engine_threads}
    engine.update(serving.pop("engine", {}))
    return load_settings(
        env={"RAYLOOP_HOME": home},
        overrides={
            "serving": {
                "app_name": "bench",
                "http_port": 18732,
                "replicas": 1,
                "replica_num_cpus": 0.5,
                "capture": True,
                "max_ongoing_requests": 64,
                "engine": engine,
                **serving,
            }
        },
    )


def compare(vllm_url: str, rl_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both servers up, one loaded at a time, alternating ``--rounds`` times at each concurrency (``vllm`` is
    the baseline: vLLM's server, or rayloop at ``--baseline-rev``)."""
    runs = []
    for c in args.concurrency:
        v, r = [], []
        for _ in range(args.rounds):
            v.append(asyncio.run(run_load(vllm_url, "demo", c, args.seconds, args.tokens)))
            r.append(asyncio.run(run_load(rl_url, "demo", c, args.seconds, args.tokens)))
        runs.append({"concurrency": c, "vllm": v, "rayloop": r})
        print(f"  c={c}: baseline {_tok_s(v):.0f} tok/s, rayloop {_tok_s(r):.0f} tok/s", file=sys.stderr)
    return runs


def _tok_s(rounds: list[dict[str, Any]]) -> float:
    return sum(x["output_tok_s"] for x in rounds) / len(rounds)


def _ms(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(x[key] for x in rounds)


def bench(model_dir: str, v2_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from rayloop.serving.deploy import deploy, model_config_for_path

    out: dict[str, Any] = {"variants": [], "baseline": f"rayloop@{args.baseline_rev}" if args.baseline_rev else "vLLM"}
    baseline = rev_server(args.baseline_rev, model_dir, args) if args.baseline_rev else vllm_server(model_dir)
    with baseline as (vllm_url, vllm_start, vllm_mem):
        out["vllm"] = {"start_s": vllm_start, "mem_gib": vllm_mem}
        home = tempfile.mkdtemp(prefix="rl-bench-")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        mem = MemSampler()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": 18732})
            rl_url = "http://127.0.0.1:18732"
            for i, name in enumerate(args.variants):
                if i:
                    serve.delete("bench")  # other settings: a new application, not an upgrade
                settings = rayloop_settings(home, args, **VARIANTS[name])
                t0 = time.monotonic()
                deploy(settings, model_config_for_path("demo", model_dir, 1), timeout_s=400)
                wait_ready(rl_url)
                entry: dict[str, Any] = {"variant": name, "start_s": time.monotonic() - t0}
                if i == 0:
                    time.sleep(3)
                    out["rayloop_mem_gib"] = mem.stop()
                print(f"{name}:", file=sys.stderr)
                entry["runs"] = compare(vllm_url, rl_url, args)
                out["variants"].append(entry)
                if i == 0:
                    out.update(upgrade_timings(settings, home, v2_dir))
        finally:
            serve.shutdown()
            ray.shutdown()
    return out


def upgrade_timings(settings: Any, home: str, v2_dir: str) -> dict[str, Any]:
    """In-place swap to v2 vs an engine rebuild with v3, from the replica's own reports."""
    from rayloop.serving.deploy import deploy, model_config_for_path

    out: dict[str, Any] = {}
    r = deploy(settings, model_config_for_path("demo", v2_dir, 2), timeout_s=400)
    out["in_place_s"] = r.replicas[0]["last_swap"]["seconds"]
    out["in_place_mode"] = r.replicas[0]["last_swap"]["mode"]
    # A replica restart with the new version: a version without a golden record is rebuilt.
    v3_dir = Path(home) / "v3"
    shutil.copytree(v2_dir, v3_dir)
    (v3_dir / "README.md").write_text("same weights, new fingerprint\n")
    r = deploy(settings, model_config_for_path("demo", v3_dir, 3), timeout_s=400, record_golden=False)
    out["rebuild_s"] = r.replicas[0]["last_swap"]["seconds"]
    out["rebuild_mode"] = r.replicas[0]["last_swap"]["mode"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Model directory (the demo base model).")
    p.add_argument("--seconds", type=float, default=10.0, help="Length of one load round.")
    p.add_argument("--rounds", type=int, default=2, help="Alternating rounds per server and concurrency.")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--out", type=Path, help="Write the JSON result here.")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=["default"],
        help="rayloop configurations, each measured against vLLM (upgrade timings with the defaults).",
    )
    p.add_argument("--baseline-rev", help="Measure against rayloop at this git revision instead of vLLM.")
    p.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=18733, help=argparse.SUPPRESS)
    p.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        help="rayloop's engine.cpu_threads (default 1, rayloop's default; 2 measured slower here: the engine's "
        "OpenMP threads spin on the cores the Serve processes need).",
    )
    args = p.parse_args()
    if args.serve_only:
        serve_only(args.model, args.port, args)
        return

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from serving_util import make_variant  # type: ignore[import-not-found]

    v2_dir = str(make_variant(Path(args.model), Path(tempfile.mkdtemp(prefix="rl-bench-v2-")), seed=1, scale=0.5))
    result = bench(args.model, v2_dir, args)
    result.update(tokens=args.tokens, seconds=args.seconds, rounds=args.rounds, cpus=os.cpu_count())
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    b = result["baseline"]
    print(
        f"\n| rayloop variant | concurrency | {b} tok/s | rayloop tok/s | ratio | TTFT p50 {b} / rayloop (ms) "
        f"| TTFT p99 {b} / rayloop (ms) | messages per answer {b} / rayloop |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for entry in result["variants"]:
        for run in entry["runs"]:
            v, r = run["vllm"], run["rayloop"]
            msgs = [sum(x["messages"] for x in side) / sum(x["requests"] for x in side) for side in (v, r)]
            print(
                f"| {entry['variant']} | {run['concurrency']} | {_tok_s(v):.0f} | {_tok_s(r):.0f} "
                f"| {_tok_s(r) / _tok_s(v):.2f} "
                f"| {_ms(v, 'ttft_p50_ms'):.0f} / {_ms(r, 'ttft_p50_ms'):.0f} "
                f"| {_ms(v, 'ttft_p99_ms'):.0f} / {_ms(r, 'ttft_p99_ms'):.0f} | {msgs[0]:.1f} / {msgs[1]:.1f} |"
            )
    by_name = {e["variant"]: e for e in result["variants"]}
    for what, off_name in (("capture", "capture-off"), ("capture ack", "capture-ack-off"), ("metrics", "metrics-off")):
        if "default" not in by_name or off_name not in by_name:
            continue
        # Each variant against the baseline in its own alternating rounds (the VM's drift cancels), then on / off.
        for on, off in zip(by_name["default"]["runs"], by_name[off_name]["runs"], strict=True):
            rel_on = _tok_s(on["rayloop"]) / _tok_s(on["vllm"])
            rel_off = _tok_s(off["rayloop"]) / _tok_s(off["vllm"])
            print(f"{what} on / off at concurrency {on['concurrency']}: {rel_on / rel_off:.2f}x")
    print(
        f"\nmemory growth at start: {b} {result['vllm']['mem_gib']:.2f} GiB, rayloop {result['rayloop_mem_gib']:.2f} GiB"
    )
    print(
        f"upgrade: in place {result['in_place_s'] * 1000:.0f} ms ({result['in_place_mode']}), "
        f"rebuild {result['rebuild_s']:.1f} s ({result['rebuild_mode']}): "
        f"ratio {result['in_place_s'] / result['rebuild_s']:.3f}"
    )


if __name__ == "__main__":
    main()
