"""Training throughput: Ray Train + DeepSpeed (1 and 2 workers) vs a plain single-process PyTorch loop.

    flock /tmp/rayloop-heavy.lock .venv/bin/python benchmarks/train/bench_train.py --base /path/to/base-model \
        --json /tmp/bench_train.json

Same model (the demo base), same snapshot blocks, fp32, same global batch
(16 blocks of 64 tokens). Tokens/s counts non-padding tokens in the timed
loop (start-up excluded; reported separately as wall time).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any


def plain_loop(model_dir: Path, blocks: dict[str, Any], steps: int, batch: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    n = blocks["input_ids"].shape[0]
    g = torch.Generator().manual_seed(0)
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        b = {k: v[idx] for k, v in blocks.items()}
        out = model(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    s = time.perf_counter() - t0
    return {"tokens_per_s": tokens / s, "seconds": s, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import pyarrow.parquet as pq
    import ray
    import torch

    from rayloop.config import load_settings
    from rayloop.data.preprocess import preprocess
    from rayloop.data.replay import ReplaySource
    from rayloop.data.snapshot import parquet_files, snapshot_key, storage_of
    from rayloop.demo.synthetic import write_interactions
    from rayloop.demo.world import World
    from rayloop.training.retrain import retrain

    home = Path(tempfile.mkdtemp(prefix="bench-train-"))
    settings = load_settings(env={"RAYLOOP_HOME": str(home)}, overrides={"training": {"epochs": a.epochs}})
    st = storage_of(settings)
    write_interactions(st, World.build(), n=500, covering=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20)
    results: dict[str, Any] = {}
    try:
        info = preprocess(settings, model_dir=a.base, replay=ReplaySource.from_model_dir(a.base))
        for workers in (1, 2):
            settings.training.micro_batch_size = 16 // workers
            t0 = time.perf_counter()
            r = retrain(
                settings,
                snapshot_id=info.snapshot_id,
                base_dir=a.base,
                output_dir=home / f"out{workers}",
                workers=workers,
                zero_stage=2,
            )
            results[f"ray_deepspeed_{workers}w"] = {
                "tokens_per_s": round(r.metrics["tokens_per_s"], 1),
                "train_seconds": round(r.metrics["train_seconds"], 1),
                "wall_seconds": round(time.perf_counter() - t0, 1),
                "steps": r.steps,
            }
    finally:
        ray.shutdown()
    tables = [pq.read_table(p) for p in parquet_files(st, snapshot_key(info.snapshot_id, "train", "blocks"))]
    blocks = {
        k: torch.tensor([x for t in tables for x in t[k].to_pylist()], dtype=torch.long)
        for k in ("input_ids", "labels", "attention_mask", "position_ids")
    }
    steps = results["ray_deepspeed_2w"]["steps"]
    results["plain_torch"] = {k: round(v, 1) for k, v in plain_loop(a.base, blocks, steps, 16).items()}
    base = results["plain_torch"]["tokens_per_s"]
    for k in ("ray_deepspeed_1w", "ray_deepspeed_2w"):
        results[k]["vs_plain"] = round(results[k]["tokens_per_s"] / base, 2)
    print(json.dumps(results, indent=1))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
