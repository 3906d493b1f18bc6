"""Preprocessing throughput and memory: Ray Data pipeline vs single-process pandas, same steps, same run.

    flock /tmp/rayloop-heavy.lock .venv/bin/python benchmarks/data/bench_preprocess.py --base /path/to/base-model \
        --rows 2000 --scale 10 50 --json /tmp/bench_data.json

For each size (rows, rows*scale) it writes simulated interactions + feedback,
then times (1) ``rayloop.data.preprocess`` on a local Ray with 2 CPUs and
(2) a pandas version of the same steps (read, join, policy, scrub, dedupe,
tokenize, pack) in one process; each side in a fresh interpreter. Memory: peak of the summed RSS of this
process and every Ray worker/raylet child, sampled every 0.1 s (Ray), and
this process's peak RSS growth (pandas).

RSS counts a shared page (the object store's, shared libraries') in every
process that maps it, so the summed RSS overstates; the summed PSS (each shared
page divided among the processes mapping it) is the machine's real use, and is
the number to compare across sizes. Both are reported, and the driver's own PSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil


class PeakRSS:
    """Samples this process and its descendants: peak summed RSS, peak summed PSS, peak PSS of this process."""

    def __init__(self, interval: float = 0.1, pss: bool = False) -> None:
        self.peak = 0
        self.peak_pss = 0
        self.peak_driver_pss = 0
        self.at_peak: dict[str, int] = {}  # PSS by process kind when the summed PSS peaked
        self._interval = interval
        self._pss = pss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = total_pss = 0
            kinds: dict[str, int] = {}
            for p in [me, *me.children(recursive=True)]:
                try:
                    if self._pss:
                        full = p.memory_full_info()
                        total += full.rss
                        total_pss += full.pss
                        kind = "driver" if p.pid == me.pid else _kind(p)
                        kinds[kind] = kinds.get(kind, 0) + full.pss
                        kinds[f"{kind} (processes)"] = kinds.get(f"{kind} (processes)", 0) + 1
                        # Private pages; PSS minus this is the share of shared ones (libraries, object store).
                        kinds[f"{kind} (private)"] = kinds.get(f"{kind} (private)", 0) + full.uss
                        if p.pid == me.pid:
                            self.peak_driver_pss = max(self.peak_driver_pss, full.pss)
                    else:
                        total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            if total_pss > self.peak_pss:
                self.peak_pss, self.at_peak = total_pss, kinds
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _kind(p: psutil.Process) -> str:
    """``ray::IDLE``-style worker titles and Ray's own daemons, by name; the rest by executable."""
    cmd = p.cmdline()
    first = cmd[0] if cmd else p.name()
    if first.startswith("ray::"):
        return "ray workers"
    return Path(first).name[:24]


def pandas_pipeline(root: Path, model_dir: Path) -> int:
    """The same steps in one process with pandas; returns the number of packed blocks."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayloop.config import DataSettings
    from rayloop.data.format import encode_example, load_tokenizer, pack
    from rayloop.data.transforms import feedback_to_common, interactions_to_common, resolve_request

    settings = DataSettings()
    tok = load_tokenizer(model_dir)
    inter = pq.read_table(root / "interactions", partitioning=None)
    fb = pq.read_table(root / "feedback", partitioning=None)
    both = pa.concat_tables([interactions_to_common(inter), feedback_to_common(fb)]).to_pandas()
    rows = [
        resolve_request(pa.Table.from_pandas(g, preserve_index=False), settings, None).to_pylist()[0]
        for _, g in both.groupby("request_id", sort=False)
    ]
    df = pd.DataFrame(rows)
    df = df[df["label"].isin(["corrected", "positive", "unrated"])]
    df = df.sort_values("request_id").drop_duplicates("dedupe_key")
    blocks = 0
    for _, g in df.groupby("split"):
        ex = [encode_example(tok, json.loads(m), r) for m, r in zip(g["messages"], g["response"], strict=True)]
        blocks += len(pack(ex, settings.block_size, tok.pad_token_id, share_blocks=settings.pack_examples))
    return blocks


def _ray_side(home: Path, model_dir: Path) -> dict[str, Any]:
    import ray

    from rayloop.config import load_settings
    from rayloop.data.preprocess import preprocess

    settings = load_settings(env={"RAYLOOP_HOME": str(home)})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20)
    try:
        with PeakRSS(interval=0.25, pss=True) as mem:
            t0 = time.perf_counter()
            info = preprocess(settings, model_dir=model_dir)
            seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {
        "seconds": seconds,
        "peak_rss_mb": round(mem.peak / 2**20),
        "peak_pss_mb": round(mem.peak_pss / 2**20),
        "driver_peak_pss_mb": round(mem.peak_driver_pss / 2**20),
        "at_peak_pss_mb": {
            k: v if k.endswith("(processes)") else round(v / 2**20)
            for k, v in sorted(mem.at_peak.items(), key=lambda kv: -kv[1])
        },
        "blocks": info.counts["train_blocks"] + info.counts["eval_blocks"],
    }


def _pandas_side(home: Path, model_dir: Path) -> dict[str, Any]:
    import pandas  # noqa: F401  (imported before the baseline is taken: the library is not the data)

    from rayloop.data.format import load_tokenizer

    load_tokenizer(model_dir)
    before = psutil.Process().memory_info().rss
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        blocks = pandas_pipeline(home / "storage", model_dir)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_growth_mb": round((mem.peak - before) / 2**20), "blocks": blocks}


def _in_subprocess(side: str, home: Path, model_dir: Path) -> dict[str, Any]:
    """Each side runs in a fresh interpreter: nothing one run allocated counts against the next."""
    out = subprocess.run(
        [sys.executable, __file__, "--base", str(model_dir), "--side", side, "--home", str(home)],
        check=True,
        capture_output=True,
        text=True,
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("SIDE ")][-1]
    result: dict[str, Any] = json.loads(line.removeprefix("SIDE "))
    return result


def run_size(n: int, model_dir: Path) -> dict[str, Any]:
    from rayloop.config import load_settings
    from rayloop.data.snapshot import storage_of
    from rayloop.demo.synthetic import write_interactions
    from rayloop.demo.world import World

    home = Path(tempfile.mkdtemp(prefix="bench-data-"))
    settings = load_settings(env={"RAYLOOP_HOME": str(home)})
    write_interactions(storage_of(settings), World.build(), n=n, rows_per_file=2000)
    r = _in_subprocess("ray", home, model_dir)
    p = _in_subprocess("pandas", home, model_dir)
    shutil.rmtree(home, ignore_errors=True)
    return {
        "rows": n,
        "ray_seconds": round(r["seconds"], 2),
        "ray_rows_per_s": round(n / r["seconds"], 1),
        "ray_peak_rss_mb": r["peak_rss_mb"],
        "ray_peak_pss_mb": r["peak_pss_mb"],
        "ray_driver_peak_pss_mb": r["driver_peak_pss_mb"],
        "ray_at_peak_pss_mb": r["at_peak_pss_mb"],
        "pandas_seconds": round(p["seconds"], 2),
        "pandas_rows_per_s": round(n / p["seconds"], 1),
        "pandas_peak_rss_growth_mb": p["peak_rss_growth_mb"],
        "blocks_ray": r["blocks"],
        "blocks_pandas": p["blocks"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, type=Path, help="Demo base model directory (tokenizer source).")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--scale", type=int, nargs="+", default=[10], help="Further sizes, as multiples of --rows.")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--side", choices=["ray", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        side = _ray_side if a.side == "ray" else _pandas_side
        print("SIDE " + json.dumps(side(a.home, a.base)), flush=True)
        return
    results = []
    for n in [a.rows, *(a.rows * k for k in a.scale)]:
        results.append(run_size(n, a.base))
        print(json.dumps(results[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
