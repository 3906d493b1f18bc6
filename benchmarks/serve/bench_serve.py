"""Serving benchmark: rayloop on Ray Serve vs vLLM's own OpenAI server, same model, same client.

    flock /tmp/rayloop-heavy.lock nice -n -10 .venv/bin/python benchmarks/serve/bench_serve.py --model DIR

Both servers get the same engine settings (bf16, max_model_len 256, 1 GiB KV
cache, eager). One asyncio client streams chat completions of exactly
``--tokens`` output tokens (``ignore_eos``) at each concurrency for
``--seconds``, and reports output tokens/s, TTFT p50/p99 and peak memory
growth of the machine. Then it times an in-place upgrade (weights swap +
golden check) against an engine rebuild with the new version. Prints JSON and
a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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


def bench_vllm(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
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
        out: dict[str, Any] = {"start_s": time.monotonic() - t0, "runs": []}
        for c in args.concurrency:
            out["runs"].append(asyncio.run(run_load(url, "demo", c, args.seconds, args.tokens)))
    finally:
        proc.terminate()
        proc.wait(60)
        out["peak_mem_gib"] = mem.stop()
    return out


def bench_rayloop(
    model_dir: str, v2_dir: str, args: argparse.Namespace, stream_interval_ms: float, upgrades: bool
) -> dict[str, Any]:
    import ray
    from ray import serve

    from rayloop.config import load_settings
    from rayloop.serving.deploy import deploy, model_config_for_path

    home = tempfile.mkdtemp(prefix="rl-bench-")
    settings = load_settings(
        env={"RAYLOOP_HOME": home},
        overrides={
            "serving": {
                "app_name": "bench",
                "http_port": 18732,
                "replicas": 1,
                "replica_num_cpus": 0.5,
                "capture": True,
                "max_ongoing_requests": 64,
                "stream_interval_ms": stream_interval_ms,
                "stream_messages_per_s": args.stream_messages_per_s if stream_interval_ms else 0,
                "engine": {
                    "kv_cache_gib": 1,
                    "max_model_len": 256,
                    "max_num_seqs": 64,
                    "cpu_threads": args.engine_threads,
                },
            }
        },
    )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    mem = MemSampler()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {"runs": [], "stream_interval_ms": stream_interval_ms, "engine_threads": args.engine_threads}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 18732})
        t0 = time.monotonic()
        deploy(settings, model_config_for_path("demo", model_dir, 1), timeout_s=400)
        out["start_s"] = time.monotonic() - t0
        url = "http://127.0.0.1:18732"
        wait_ready(url)
        for c in args.concurrency:
            out["runs"].append(asyncio.run(run_load(url, "demo", c, args.seconds, args.tokens)))
        out["peak_mem_gib"] = mem.stop()
        if not upgrades:
            return out
        # Upgrade timings, from the replicas' own reports (not the Serve control loop around them).
        v2 = model_config_for_path("demo", v2_dir, 2)
        r = deploy(settings, v2, timeout_s=400)
        out["in_place_s"] = r.replicas[0]["last_swap"]["seconds"]
        out["in_place_mode"] = r.replicas[0]["last_swap"]["mode"]
        out["in_place_total_s"] = r.seconds
        # A replica restart with the new version: a version without a golden record is rebuilt.
        v3_dir = Path(home) / "v3"
        shutil.copytree(v2_dir, v3_dir)
        (v3_dir / "README.md").write_text("same weights, new fingerprint\n")
        r = deploy(settings, model_config_for_path("demo", v3_dir, 3), timeout_s=400, record_golden=False)
        out["rebuild_s"] = r.replicas[0]["last_swap"]["seconds"]
        out["rebuild_mode"] = r.replicas[0]["last_swap"]["mode"]
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Model directory (the demo base model).")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--out", type=Path, help="Write the JSON result here.")
    p.add_argument(
        "--stream-interval-ms",
        type=float,
        nargs="+",
        default=[0.0],
        help="rayloop's serving.stream_interval_ms; one rayloop run per value (upgrade timings on the first).",
    )
    p.add_argument(
        "--stream-messages-per-s", type=float, default=100.0, help="rayloop's serving.stream_messages_per_s."
    )
    p.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        help="rayloop's engine.cpu_threads (default 1, rayloop's default; 2 measured slower here: the engine's "
        "OpenMP threads spin on the cores the Serve processes need).",
    )
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from serving_util import make_variant  # type: ignore[import-not-found]

    v2_dir = str(make_variant(Path(args.model), Path(tempfile.mkdtemp(prefix="rl-bench-v2-")), seed=1, scale=0.5))
    vllm = bench_vllm(args.model, args)
    rls = [bench_rayloop(args.model, v2_dir, args, ms, upgrades=i == 0) for i, ms in enumerate(args.stream_interval_ms)]
    rl = rls[0]
    result = {"vllm": vllm, "rayloop": rls, "tokens": args.tokens, "seconds": args.seconds, "cpus": os.cpu_count()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(
        "\n| stream interval | concurrency | vLLM tok/s | rayloop tok/s | ratio | TTFT p50 vLLM / rayloop (ms) "
        "| TTFT p99 vLLM / rayloop (ms) | SSE events per request vLLM / rayloop |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rls:
        for a, b in zip(vllm["runs"], r["runs"], strict=True):
            print(
                f"| {r['stream_interval_ms']:.0f} ms | {a['concurrency']} | {a['output_tok_s']:.0f} | {b['output_tok_s']:.0f} "
                f"| {b['output_tok_s'] / a['output_tok_s']:.2f} "
                f"| {a['ttft_p50_ms']:.0f} / {b['ttft_p50_ms']:.0f} | {a['ttft_p99_ms']:.0f} / {b['ttft_p99_ms']:.0f} "
                f"| {a['messages'] / a['requests']:.1f} / {b['messages'] / b['requests']:.1f} |"
            )
    mems = ", ".join(f"{r['peak_mem_gib']:.2f}" for r in rls)
    print(f"\npeak memory growth: vLLM {vllm['peak_mem_gib']:.2f} GiB, rayloop {mems} GiB")
    print(
        f"upgrade: in place {rl['in_place_s'] * 1000:.0f} ms ({rl['in_place_mode']}), "
        f"rebuild {rl['rebuild_s']:.1f} s ({rl['rebuild_mode']}): ratio {rl['in_place_s'] / rl['rebuild_s']:.3f}"
    )


if __name__ == "__main__":
    main()
