"""Where the preprocessing driver's memory goes: its RSS/PSS/USS every few seconds, with the line of
``rayloop/data/preprocess.py`` the driver is on.

    .venv/bin/python benchmarks/data/driver_memory_by_stage.py --base /path/to/base-model --rows 100000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import psutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, type=Path, help="Demo base model directory (tokenizer source).")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--every", type=float, default=3.0, help="Seconds between samples.")
    a = ap.parse_args()

    import pyarrow as pa
    import ray

    from rayloop.config import load_settings
    from rayloop.data.preprocess import preprocess
    from rayloop.data.snapshot import storage_of
    from rayloop.demo.synthetic import write_interactions
    from rayloop.demo.world import World

    home = Path(tempfile.mkdtemp(prefix="bench-driver-mem-"))
    settings = load_settings(env={"RAYLOOP_HOME": str(home)})
    write_interactions(storage_of(settings), World.build(), n=a.rows, rows_per_file=2000)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20)
    main_id = threading.main_thread().ident
    done = threading.Event()
    t0 = time.time()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            m = me.memory_full_info()
            where = ""
            frame = sys._current_frames().get(main_id)
            for f in traceback.extract_stack(frame):
                if f.filename.endswith("rayloop/data/preprocess.py"):
                    where = f"{f.lineno}: {f.line}"[:100]
            # Arrow's pool: what this process holds of blocks and scans. (tracemalloc would split the rest
            # further, but it slows transformers' imports and tokenizer load ~20x.)
            extra = f"arrow {pa.total_allocated_bytes() >> 20:5d}"
            print(
                f"{time.time() - t0:7.1f}s  rss {m.rss >> 20:5d}  pss {m.pss >> 20:5d}  uss {m.uss >> 20:5d}  "
                f"{extra} MB  {where}",
                flush=True,
            )
            done.wait(a.every)

    threading.Thread(target=sample, daemon=True).start()
    try:
        preprocess(settings, model_dir=a.base)
    finally:
        done.set()
        ray.shutdown()


if __name__ == "__main__":
    main()
