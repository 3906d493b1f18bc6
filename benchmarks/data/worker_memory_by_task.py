"""Which preprocessing task a Ray worker runs when its private memory peaks.

    .venv/bin/python benchmarks/data/worker_memory_by_task.py --base /path/to/base-model --rows 20000 100000

For each size: simulated interactions + feedback, then ``rayloop.data.preprocess`` on a local Ray
with 2 CPUs while a thread samples every Ray worker's USS and its process title (``ray::`` plus the
Ray Data operator chain it runs, or ``IDLE``). Prints the workers' summed USS at its peak and the
peak USS seen under each title. Compare sizes: what grows with the rows shows under its task.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil


class WorkerSampler:
    def __init__(self, interval: float = 0.2) -> None:
        self.peak_total = 0
        self.at_peak: dict[int, tuple[str, int]] = {}
        self.peak_by_title: dict[str, int] = {}
        self._interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total, snap = 0, {}
            for p in me.children(recursive=True):
                try:
                    cmd = p.cmdline()
                    if not cmd or not cmd[0].startswith("ray::"):
                        continue
                    uss = p.memory_full_info().uss
                except psutil.Error:
                    continue
                title = cmd[0][:70]
                total += uss
                snap[p.pid] = (title, uss)
                self.peak_by_title[title] = max(self.peak_by_title.get(title, 0), uss)
            if total > self.peak_total:
                self.peak_total, self.at_peak = total, snap
            time.sleep(self._interval)

    def __enter__(self) -> WorkerSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def run_size(n: int, model_dir: Path) -> None:
    import ray

    from rayloop.config import load_settings
    from rayloop.data.preprocess import preprocess
    from rayloop.data.snapshot import storage_of
    from rayloop.demo.synthetic import write_interactions
    from rayloop.demo.world import World

    home = Path(tempfile.mkdtemp(prefix="bench-wmem-"))
    try:
        settings = load_settings(env={"RAYLOOP_HOME": str(home)})
        write_interactions(storage_of(settings), World.build(), n=n, rows_per_file=2000)
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20
        )
        try:
            with WorkerSampler() as s:
                t0 = time.perf_counter()
                preprocess(settings, model_dir=model_dir)
                seconds = time.perf_counter() - t0
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    mb = 2**20
    print(f"== {n} rows: {seconds:.1f} s, Ray workers' summed USS peak {s.peak_total // mb} MB")
    for pid, (title, uss) in sorted(s.at_peak.items()):
        print(f"   at the peak: pid {pid} {uss // mb:5d} MB  {title}")
    print("   peak USS by title:")
    for title, uss in sorted(s.peak_by_title.items(), key=lambda kv: -kv[1])[:10]:
        print(f"   {uss // mb:5d} MB  {title}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, type=Path, help="Demo base model directory (tokenizer source).")
    ap.add_argument("--rows", type=int, nargs="+", default=[20000, 100000])
    a = ap.parse_args()
    for n in a.rows:
        run_size(n, a.base)


if __name__ == "__main__":
    main()
