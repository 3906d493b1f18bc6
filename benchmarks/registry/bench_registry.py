"""Registry throughput against a plain ``pyarrow.fs`` copy of the same files, in the same run.

Generates an HF-style directory with ``--size-mb`` of random safetensors
weights, then alternates, ``--repeats`` times:

- hash only:      sha256 of the source files, nothing copied (the floor for any verified copy)
- baseline up:    ``pyarrow.fs.copy_files(model_dir -> storage)``
- register:       ``Registry.register`` (hash every byte, upload, manifest, SQL rows)
- baseline down:  ``pyarrow.fs.copy_files(storage -> local dir)``
- fetch (cold):   ``Registry.fetch`` into an empty cache (download + verify every hash)
- fetch (cached): ``Registry.fetch`` again (cache hit: stat checks only)

and reports medians and ratios (registry throughput / plain copy throughput;
target >= 0.8x, cached fetch well under a second).

    python benchmarks/registry/bench_registry.py --size-mb 500 --json out.json
    python benchmarks/registry/bench_registry.py --size-mb 500 --moto   # S3 API on a local moto server
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rayloop.registry import Registry, artifacts


def make_model(path: Path, size_mb: int, shards: int, seed: int = 0) -> int:
    """An HF-style directory: config.json plus ``shards`` safetensors files of random float32."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 1024}))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    rng = np.random.default_rng(seed)
    per_shard = size_mb * (1 << 20) // shards // 4
    cols = 1024
    for i in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({"w": rng.random((per_shard // cols, cols), dtype=np.float32)}, str(path / name))
    return sum(p.stat().st_size for p in path.iterdir())


def timed(fn: Any) -> float:
    # Start every step with no dirty pages: otherwise the 4th 500 MB write in a row
    # is throttled by writeback of the earlier ones and the order decides the result.
    os.sync()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=500, help="Total safetensors size (default 500).")
    ap.add_argument("--shards", type=int, default=2, help="Number of safetensors files (default 2).")
    ap.add_argument("--repeats", type=int, default=3, help="Rounds; medians are reported (default 3).")
    ap.add_argument("--workdir", default=None, help="Scratch directory (default: a new temp dir, removed after).")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write the results here.")
    ap.add_argument("--moto", action="store_true", help="Use S3 storage on a moto server started for the run.")
    args = ap.parse_args()
    if args.moto:
        from tests.integration.registry_servers import S3_ENV, create_bucket, moto_s3_server

        os.environ.update(S3_ENV)
        with moto_s3_server() as endpoint:
            create_bucket(endpoint, "rayloop-bench")
            run(args, "s3://rayloop-bench/root", endpoint)
    else:
        run(args, None, None)


def run(args: argparse.Namespace, storage_uri: str | None, endpoint: str | None) -> None:

    import pyarrow.fs as pafs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rayloop-bench-registry-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = work / "model"
        size = make_model(model, args.size_mb, args.shards)
        mb = size / (1 << 20)
        storage = storage_uri or str(work / "storage")
        reg = Registry(storage, f"sqlite:///{work / 'registry.db'}", cache_dir=work / "cache", s3_endpoint=endpoint)
        local = pafs.LocalFileSystem()
        keys = ("hash_only", "copy_up", "register", "copy_down", "fetch_cold", "fetch_cached")
        times: dict[str, list[float]] = {k: [] for k in keys}
        sources = artifacts.scan_model_dir(model)
        for r in range(args.repeats):
            # The floor: sha256 of every byte, files in parallel, nothing copied.
            times["hash_only"].append(timed(lambda: artifacts.hash_files(sources, workers=reg.io_workers)))
            up = reg.storage.path(f"baseline/{r}")
            reg.storage.makedirs(f"baseline/{r}")  # copy_files does not create the target directory
            times["copy_up"].append(
                timed(
                    lambda up=up: pafs.copy_files(
                        str(model), up, source_filesystem=local, destination_filesystem=reg.storage.fs
                    )
                )
            )
            mv = None

            def do_register() -> None:
                nonlocal mv
                mv = reg.register("bench", model)

            times["register"].append(timed(do_register))
            assert mv is not None
            down = str(work / f"down-{r}")
            os.makedirs(down)
            times["copy_down"].append(
                timed(
                    lambda up=up, down=down: pafs.copy_files(
                        up, down, source_filesystem=reg.storage.fs, destination_filesystem=local
                    )
                )
            )
            fetched: list[Path] = []
            times["fetch_cold"].append(timed(lambda mv=mv, out=fetched: out.append(reg.fetch(mv.ref))))
            times["fetch_cached"].append(timed(lambda mv=mv, out=fetched: out.append(reg.fetch(mv.ref))))
            assert fetched[0] == fetched[1]
            # Keep the disk footprint flat between rounds, and let the deletes (the
            # filesystem may discard freed blocks) settle before the next timed step.
            reg.storage.delete(f"baseline/{r}")
            shutil.rmtree(down)
            shutil.rmtree(reg.cache_dir, ignore_errors=True)
            reg.delete(mv.ref)
            os.sync()
            time.sleep(2)
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "storage": "s3 (moto server)" if storage_uri else "local",
            "size_mb": round(mb, 1),
            "files": len(list(model.iterdir())),
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "throughput_mb_s": {k: round(mb / v, 1) for k, v in med.items() if k != "fetch_cached"},
            "ratio_register_vs_copy": round(med["copy_up"] / med["register"], 3),
            "ratio_fetch_vs_copy": round(med["copy_down"] / med["fetch_cold"], 3),
            "ratio_register_vs_hash_only": round(med["hash_only"] / med["register"], 3),
            "fetch_cached_s": round(med["fetch_cached"], 4),
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        }
        print(json.dumps(result, indent=2))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
