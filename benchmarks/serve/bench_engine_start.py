"""Engine start: rayloop's single-process CPU engine vs vLLM's default three-process layout.

    .venv/bin/python benchmarks/serve/bench_engine_start.py --model DIR --rounds 3

vLLM's CPU platform runs every engine through its multiprocessing executor,
so an ``AsyncLLM`` is the caller, an engine-core process and a worker process,
and ``vllm.LLM`` the caller plus the same two. rayloop turns vLLM's
multiprocessing flag off for one-shard CPU engines (``rayloop.serving.cpu_env``):
the worker runs inside the engine core (``AsyncLLM``) or inside the caller
(``vllm.LLM``). Each measurement is a fresh Python process (imports included,
as for a Serve replica or a Ray Data actor) timed from start to the first
greedy answer; the modes alternate round by round. Prints JSON and a Markdown
table with medians and the ratio baseline / rayloop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

KINDS = ("async", "offline")  # AsyncLLM (serving), vllm.LLM (evaluation)
MODES = ("vllm-default", "rayloop")


def child(kind: str, mode: str, model: str) -> dict[str, Any]:
    t0 = time.monotonic()
    import asyncio

    import rayloop.serving.cpu_env as cpu_env
    from rayloop.config import EngineSettings

    if mode == "vllm-default":
        plain = cpu_env.cpu_engine_env

        def multiprocess(settings: EngineSettings) -> dict[str, str]:
            env = plain(settings)
            env.pop("OMP_NUM_THREADS", None)
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
            return env

        cpu_env.cpu_engine_env = multiprocess  # type: ignore[assignment]
    settings = EngineSettings()
    if kind == "offline":
        from rayloop.evaluation.inference import VLLMPredictor

        p = VLLMPredictor(model, settings.model_dump())
        answer = p.answer(["hello"])[0]
        seconds = time.monotonic() - t0
        p.close()
    else:
        from rayloop.serving.vllm_engine import VLLMEngine

        async def run() -> str:
            e = VLLMEngine()
            await e.start(model, settings, ["m"])
            r = await e.chat({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}, "bench")
            out = str((r.body or {}).get("choices", [{}])[0].get("message", {}).get("content"))
            await e.shutdown()
            return out

        answer = asyncio.run(run())
        seconds = time.monotonic() - t0
    return {"kind": kind, "mode": mode, "seconds": round(seconds, 2), "answer": answer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (e.g. one built by `rayloop init`).")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], a.child[1], a.model)), flush=True)
        return
    results: list[dict[str, Any]] = []
    for r in range(a.rounds):
        for kind in KINDS:
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                cmd = [sys.executable, __file__, "--model", a.model, "--child", kind, mode]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{kind}/{mode} failed ({out.returncode}):\n{out.stderr[-3000:]}")
                res = json.loads(line[7:])
                results.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
    rows = []
    for kind in KINDS:
        med = {
            m: statistics.median(x["seconds"] for x in results if x["kind"] == kind and x["mode"] == m) for m in MODES
        }
        same = len({x["answer"] for x in results if x["kind"] == kind}) == 1
        rows.append({"kind": kind, **med, "ratio": round(med["vllm-default"] / med["rayloop"], 2), "same": same})
    print(json.dumps({"rounds": a.rounds, "results": results, "summary": rows}, indent=1))
    print("\n| engine | vLLM default (3 processes) | rayloop (one-shard CPU) | speed-up | same greedy answer |")
    print("|---|---|---|---|---|")
    for row in rows:
        name = "AsyncLLM (Serve replica)" if row["kind"] == "async" else "vllm.LLM (evaluation actor)"
        print(
            f"| {name} | {row['vllm-default']:.1f} s | {row['rayloop']:.1f} s | **{row['ratio']:.2f}x** | {row['same']} |"
        )


if __name__ == "__main__":
    main()
