"""Ray Data ``read_parquet`` on a small snapshot: the reader rayloop uses vs Ray 2.60's default.

    flock /tmp/rayloop-heavy.lock .venv/bin/python benchmarks/data/bench_read_parquet.py --rows 300 --repeats 3

Ray 2.60 routes ``read_parquet`` through datasource V2, which starts a pool of
``FooterReader`` actors (32 by default) for every read to fetch Parquet
footers. ``rayloop.raysession.data_context()`` switches to the V1 reader. Both
read the same files in one Ray session (2 CPUs); the number is the wall time of
``take_all()``. ``first_read_s`` is each reader's first read in a fresh Ray
session (what a preprocessing job pays: it is a new driver), each in its own
session, V2 first; ``median_s`` the median of later reads, alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--files", type=int, default=4, help="Parquet files the rows are spread over")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data

    from rayloop.raysession import data_context

    d = tempfile.mkdtemp(prefix="bench-read-parquet-")
    per = max(1, args.rows // args.files)
    for i in range(args.files):
        ids = range(i * per, (i + 1) * per)
        pq.write_table(
            pa.table({"request_id": [f"r{j}" for j in ids], "prompt": [f"question {j}" for j in ids]}),
            f"{d}/part-{i}.parquet",
        )

    def read(v2: bool) -> float:
        ctx = data_context()  # rayloop's settings; only use_datasource_v2 is flipped
        ctx.use_datasource_v2 = v2  # type: ignore[attr-defined]
        t = time.perf_counter()
        rows = ray.data.read_parquet(d).take_all()
        dt = time.perf_counter() - t
        assert len(rows) == per * args.files, len(rows)
        return dt

    def fresh_session() -> None:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.range(8).take_all()  # the session's first worker processes, imports

    first: dict[str, float] = {}
    for name, v2 in (("v2_default", True), ("v1_rayloop", False)):
        fresh_session()
        first[name] = read(v2)
        ray.shutdown()
    fresh_session()
    times: dict[str, list[float]] = {"v2_default": [], "v1_rayloop": []}
    for _ in range(args.repeats):
        times["v2_default"].append(read(True))
        times["v1_rayloop"].append(read(False))
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "rows": per * args.files,
                "files": args.files,
                "num_cpus": args.num_cpus,
                "first_read_s": first,
                "first_read_speedup": round(first["v2_default"] / first["v1_rayloop"], 1),
                "seconds": times,
                "median_s": med,
                "speedup": round(med["v2_default"] / med["v1_rayloop"], 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
