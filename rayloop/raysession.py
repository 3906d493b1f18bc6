"""Attach to the Ray cluster rayloop runs on, or start a private local one.

Jobs (``ray job submit``) and CLI commands attach to the configured cluster
(``RAY_ADDRESS``, ``ray.address`` or the head ``rayloop up`` started). Without
one, a library call starts an in-process local Ray sized by ``settings.ray``
and the caller shuts it down when done (``ensure_ray`` returns True then).
"""

from __future__ import annotations

import os

from rayloop.config import Settings
from rayloop.errors import ClusterError


def ensure_ray(settings: Settings) -> bool:
    """Make sure ``ray`` is initialised; True when this call started a local instance."""
    import ray

    if ray.is_initialized():
        return False
    from rayloop import cluster

    try:
        cluster.connect(settings)
        return False
    except ClusterError:
        pass
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": never attach by accident to a head someone else started.
    ray.init(
        address="local",
        num_cpus=settings.ray.num_cpus,
        num_gpus=settings.ray.num_gpus,
        object_store_memory=settings.ray.object_store_memory_mb * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    return True


def data_context() -> object:
    """Ray Data settings for small clusters: no per-read or per-shuffle actor pools.

    - Sort-based pull shuffle: the default hash shuffle starts aggregator actors;
      on two cores that costs 8-10 s per groupby even for a few thousand rows,
      against under a second for the sort-based pull shuffle (measured in this
      repo on 20k rows).
    - The first-generation Parquet reader: Ray 2.60's ``read_parquet`` (datasource
      V2) starts 32 ``FooterReader`` actors for every read to fetch footers; on
      two cores spawning them costs ~19 s for a 300-row file, against 0.4 s for
      the V1 reader (``benchmarks/data/bench_read_parquet.py``). Footer reads
      are only worth parallelising for thousands of remote files.
    """
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ctx
