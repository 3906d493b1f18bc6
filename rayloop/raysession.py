"""Attach to the Ray cluster rayloop runs on, or start a private local one.

Jobs (``ray job submit``) and CLI commands attach to the configured cluster
(``RAY_ADDRESS``, ``ray.address`` or the head ``rayloop up`` started). Without
one, a library call starts an in-process local Ray sized by ``settings.ray``
and the caller shuts it down when done (``ensure_ray`` returns True then).
"""

from __future__ import annotations

import os
from typing import Any

from rayloop.config import Settings
from rayloop.errors import ClusterError

HEAD_RESOURCE = "node:__internal_head__"  # every Ray head node has one


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


def on_the_head() -> dict[str, Any]:
    """Actor options that put a cluster-wide singleton (the capture writer, a stats actor) on the head node.

    The head holds the cluster's control state (GCS, Serve's controller) and outlives worker nodes, which
    come and go with autoscaling and failures: a singleton there keeps its local journal when a worker node
    dies. It asks for a sliver of the head's own resource (``node:__internal_head__``) rather than for the
    head's node id: a head that comes back (GCS fault tolerance on KubeRay) has a new id but the same
    resource, so the actor restarts there. (Soft node affinity is not enough: Ray places an actor whose
    creator has a runtime environment on another node whenever the head has no CPUs.)
    """
    return {"resources": {HEAD_RESOURCE: 0.001}}
