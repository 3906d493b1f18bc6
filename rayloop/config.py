"""Typed settings: one object flows from the CLI to Serve configs and Train jobs.

Settings come, lowest priority first, from the defaults here, a YAML file
(``rayloop.yaml`` in the working directory, or ``--config``/``RAYLOOP_CONFIG``),
environment variables, then explicit overrides (``load_settings(overrides=...)``,
``--set`` of the job entrypoints).

Every setting has an environment variable: ``RAYLOOP_`` then the path of the
setting in ``rayloop.yaml`` with ``__`` between the levels
(``RAYLOOP_SERVING__HTTP_PORT=9000``, ``RAYLOOP_SERVING__ENGINE__DTYPE=float16``,
``RAYLOOP_ROLLOUT__MIN_SAMPLES=5``, ``RAYLOOP_HOME=/srv/rayloop``). Lists and
mappings are JSON (``RAYLOOP_ROLLOUT__CANARY_STEPS='[10, 50, 100]'``, or a whole
section: ``RAYLOOP_SERVING='{"http_port": 9000}'``), ``null`` unsets an optional
setting, an empty variable is ignored. These older names still work; the
``RAYLOOP_SECTION__KEY`` spelling wins where both are set:

- ``RAYLOOP_STORAGE``: ``storage.root``, a local path or a ``pyarrow.fs`` URI
  (``s3://bucket/prefix``, ``gs://...``); default ``$RAYLOOP_HOME/storage``.
- ``RAYLOOP_S3_ENDPOINT``: ``storage.s3_endpoint``.
- ``RAYLOOP_REGISTRY_URL``: ``registry.url``, ``sqlite:///path.db`` or ``postgresql://...``.
- ``RAY_ADDRESS``: ``ray.address``, attach to this cluster instead of the local one.

``RAYLOOP_NODE_DIR`` (read on each node, not a setting): the node's own directory for the model cache and
the capture journal, where the nodes of a cluster do not share the head's ``home`` path.

``RAYLOOP_HOME`` (``home``) is the root of the embedded default (``./.rayloop``);
storage and the SQLite registry live under it unless set explicitly.

Example::

    >>> from rayloop.config import Settings
    >>> s = Settings.model_validate({"ray": {"num_cpus": 2}})
    >>> s.ray.num_cpus
    2
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayloop.errors import ConfigError

_STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")
NODE_DIR_ENV = "RAYLOOP_NODE_DIR"  # a node's own directory (see Settings.node_path)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Strategy(enum.StrEnum):
    ROLLING = "rolling"
    BLUE_GREEN = "blue-green"
    CANARY = "canary"
    SHADOW = "shadow"


class UnratedPolicy(enum.StrEnum):
    KEEP = "keep"
    DROP = "drop"


def validate_storage_uri(value: str) -> str:
    """Accept a local path or a URI with a scheme pyarrow.fs understands."""
    if not value or not value.strip():
        raise ValueError("storage root is empty; give a local path or a URI such as s3://bucket/prefix")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if m and m.group(1).lower() not in _STORAGE_SCHEMES:
        raise ValueError(
            f"storage URI scheme {m.group(1)!r} in {value!r} is not supported; "
            f"use a local path or one of {', '.join(s + '://' for s in _STORAGE_SCHEMES)}"
        )
    if m and len(value) == len(m.group(0)):
        raise ValueError(f"storage URI {value!r} names no bucket or path")
    return value


class StorageSettings(_Model):
    root: str | None = Field(
        default=None,
        description="Where artifacts, interactions and snapshots live: a local path or a pyarrow.fs URI "
        "(s3://bucket/prefix). Default: $RAYLOOP_HOME/storage.",
    )
    s3_endpoint: str | None = Field(
        default=None, description="S3-compatible endpoint override, e.g. http://127.0.0.1:9000 (MinIO, moto)."
    )

    @field_validator("root")
    @classmethod
    def _check_root(cls, v: str | None) -> str | None:
        return None if v is None else validate_storage_uri(v)


class RegistrySettings(_Model):
    url: str | None = Field(
        default=None,
        description="SQL database of the model registry: sqlite:///path.db or postgresql://user@host/db. "
        "Default: sqlite under $RAYLOOP_HOME.",
    )
    password_key: str | None = Field(
        default=None,
        description="Storage key of a file holding the registry database's password, used when `url` has none. "
        "rayloop sets it for its Serve apps, so the password never travels in their arguments.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not (v.startswith("sqlite:///") or v.startswith(("postgresql://", "postgres://"))):
            raise ValueError(
                f"registry url {v!r} is not supported; use sqlite:///path/to/registry.db or postgresql://user@host/db"
            )
        return v


# Ports `ray start` reserves by default: the Ray client server and the worker range.
RAY_RESERVED_PORTS = (10001, 19999)


class RaySettings(_Model):
    address: str | None = Field(
        default=None,
        description="Ray cluster address (ray://host:10001 or host:6379). Default: $RAY_ADDRESS, else local.",
    )
    port: int = Field(default=6379, ge=1, le=65535, description="GCS port of the local head `rayloop up` starts.")
    num_cpus: int = Field(
        default=4,
        ge=0,
        description="Logical CPUs the local head advertises (explicit: never autodetected). More than a small "
        "machine's cores on purpose: Serve replicas, Train workers and Ray Data's 1-CPU file listing task must "
        "all be schedulable at once during a rollout; the work itself is light. 0: a head that only "
        "coordinates, with worker nodes doing the work (as KubeRay's head with num-cpus 0).",
    )
    num_gpus: int = Field(default=0, ge=0, description="GPUs the local head advertises.")
    dashboard_host: str = Field(default="127.0.0.1", description="Dashboard bind address.")
    dashboard_port: int = Field(default=8265, ge=1, le=65535, description="Dashboard port.")
    dashboard_agent_port: int = Field(
        default=52365,
        ge=1,
        le=65535,
        description="HTTP port of the head's dashboard agent (the Jobs API submits through it). Ray's default; "
        "change it when another Ray cluster on the same machine already holds it.",
    )
    object_store_memory_mb: int = Field(
        default=1024, ge=128, description="Object store size of the local head, in MiB."
    )
    metrics_export_port: int = Field(
        default=8080,
        ge=1,
        le=65535,
        description="Port of the Prometheus endpoint the head `rayloop up` starts exports Ray's, Serve's, vLLM's "
        "and rayloop's metrics on; $RAYLOOP_HOME/monitoring/prometheus.yml scrapes it.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources the local head advertises (ray start --resources), for example a label "
        "resource that pins work to this node.",
    )
    gcs_storage_path: str | None = Field(
        default=None,
        description="Keep the control state of the head `rayloop up` starts (Ray's GCS: Serve's apps, detached "
        "actors such as the capture writer, nodes, jobs) in a RocksDB database in this directory (relative: "
        "under $RAYLOOP_HOME), so that a head that died and is started again with `rayloop up` carries on: "
        "worker nodes reconnect (within Ray's gcs_rpc_server_reconnect_timeout_s, 60 s by default), replicas "
        "on them keep serving, and what ran on the head comes back there. Ray's embedded RocksDB backend "
        "(alpha in Ray); on Kubernetes, use KubeRay's gcsFaultToleranceOptions instead. `rayloop down` "
        "removes it: a cluster that was stopped starts empty. None: in memory, the head's death ends the cluster.",
    )
    auth: Literal["token", "disabled"] = Field(
        default="token",
        description="Ray's own authentication on the head `rayloop up` starts. 'token': every Ray client, job "
        'submission and dashboard visitor needs the token in $RAYLOOP_HOME/ray-auth-token (`eval "$(rayloop '
        "env)\"` sets it up for `ray` commands). 'disabled': anyone who reaches the head's ports can run code "
        "on it.",
    )

    @model_validator(mode="after")
    def _ports_outside_ray_ranges(self) -> RaySettings:
        # `ray start` gives the Ray client server 10001 and workers 10002-19999; a head port in
        # there fails only when the cluster starts ("used by other components").
        for name in ("port", "dashboard_port", "dashboard_agent_port", "metrics_export_port"):
            value = getattr(self, name)
            if RAY_RESERVED_PORTS[0] <= value <= RAY_RESERVED_PORTS[1]:
                raise ValueError(
                    f"{name} {value} is inside the ports Ray keeps for its client server and workers "
                    f"({RAY_RESERVED_PORTS[0]}-{RAY_RESERVED_PORTS[1]}); pick one outside it, e.g. 6379 or 26379"
                )
        return self


class EngineSettings(_Model):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="bfloat16", description="Weights dtype.")
    max_model_len: int = Field(default=256, ge=16, description="Context window the engine accepts, in tokens.")
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="Shards per engine (one GPU or CPU socket-part each)."
    )
    kv_cache_gib: float = Field(default=0.5, gt=0, description="KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE on CPU).")
    max_num_seqs: int = Field(default=64, ge=1, description="Largest batch the engine schedules.")
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="GPU only: fraction of memory vLLM may use."
    )
    enforce_eager: bool = Field(default=True, description="Skip graph capture (fast start; required on CPU).")
    log_stats: bool = Field(
        default=True,
        description="vLLM's engine statistics (KV-cache use, queue length, preemptions, token counts) on Ray's "
        "Prometheus endpoint, labelled with the Serve replica (ReplicaId).",
    )
    accelerator: Literal["cpu", "gpu"] = Field(
        default="cpu",
        description="Where engines run: 'gpu' reserves one GPU per tensor-parallel shard (placement group).",
    )
    accelerator_resource: str = Field(
        default="GPU",
        min_length=1,
        description="With accelerator 'gpu': the Ray resource each tensor-parallel shard reserves, all of an "
        "engine's on one node (STRICT_PACK). 'GPU', or the custom resource your nodes declare for their "
        "accelerators (`ray start --resources`).",
    )
    cpu_threads_bind: str | None = Field(
        default=None,
        description="CPU only: VLLM_CPU_OMP_THREADS_BIND for engine workers, e.g. '0|1' for tensor_parallel_size 2 "
        "(the default binding fails with 'Not enough allowed NUMA nodes').",
    )
    cpu_threads: int = Field(
        default=1,
        ge=1,
        description="CPU only, tensor_parallel_size 1: torch threads of the engine process (OMP_NUM_THREADS). "
        "Such an engine runs its worker in its own process, unbound, so the OS spreads engines over the cores.",
    )


class AutoscalingSettings(_Model):
    """Ray Serve autoscaling of a version slot's engine replicas (``autoscaling_config`` of its deployment)."""

    min_replicas: int = Field(
        default=1,
        ge=1,
        description="Fewest replicas per active slot (an engine start takes "
        "tens of seconds, so a slot never scales to zero).",
    )
    max_replicas: int = Field(default=2, ge=1, description="Most replicas per active slot.")
    target_ongoing_requests: float = Field(
        default=8.0, gt=0, description="Requests in flight per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Seconds of sustained load before adding a replica.")
    downscale_delay_s: float = Field(default=300.0, ge=0, description="Seconds of low load before removing a replica.")

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"serving.autoscaling.max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self

    def serve_config(self) -> dict[str, float | int]:
        """Serve's ``autoscaling_config`` for a deployment."""
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


class ServingSettings(_Model):
    app_name: str = Field(default="rayloop", description="Serve application name.")
    route_prefix: str = Field(default="/", description="HTTP route prefix of the application.")
    staging_route_prefix: str = Field(
        default="/staging",
        description="HTTP route prefix of the staging app (`rayloop deploy --env staging`): its OpenAI API is "
        "at this prefix + /v1.",
    )
    staging_replicas: int = Field(default=1, ge=1, description="Engine replicas of the staging app.")
    http_host: str = Field(default="127.0.0.1", description="Serve HTTP proxy host.")
    http_port: int = Field(default=8000, ge=1, le=65535, description="Serve HTTP proxy port.")
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        default="EveryNode",
        description="Where Serve runs HTTP proxies: on every node (put a load balancer in front of them), on the "
        "head only, or nowhere. Several Ray nodes on one machine as different Unix users cannot share a port: "
        "use HeadOnly there.",
    )
    model: str = Field(default="demo", description="Registry model name served by default.")
    replicas: int = Field(default=1, ge=1, description="Replicas per version slot (without autoscaling).")
    autoscaling: AutoscalingSettings | None = Field(
        default=None,
        description="Scale each active slot's replicas with its load (Ray Serve autoscaling) instead of a fixed "
        "`replicas`. A replica added during or after a rollout starts on the version its slot serves.",
    )
    replica_num_cpus: float = Field(
        default=0.5, gt=0, description="CPUs reserved per replica (fractional on small machines)."
    )
    max_ongoing_requests: int = Field(default=64, ge=1, description="Requests a replica accepts at once.")
    stream_interval_ms: float = Field(
        default=100.0,
        ge=0,
        le=1000,
        description="Streaming: shortest time, in milliseconds, between two SSE messages of one request; tokens "
        "generated meanwhile are joined into one message (the first token and the end are never held back). "
        "Every message crosses the replica, the ingress and the HTTP proxy, so fewer messages leave more CPU to "
        "the engine on a CPU-bound machine. 0: one message per engine step, joined only while the ingress is busy.",
    )
    stream_messages_per_s: float = Field(
        default=100.0,
        ge=0,
        description="Streaming: at most about this many messages per second per replica, over all its streams; "
        "with many streams each one's interval grows past stream_interval_ms (32 streams at 100/s: 320 ms). "
        "0: no limit.",
    )
    max_queued_requests: int = Field(
        default=256, ge=1, description="Requests waiting beyond max_ongoing_requests before new ones get 503."
    )
    max_body_bytes: int = Field(
        default=4 << 20,
        ge=1,
        description="Largest request body the ingress reads, in bytes; a larger one is answered 413 before it is "
        "parsed (by its Content-Length, or once that many bytes have arrived).",
    )
    grpc_handles: bool = Field(
        default=True,
        description="The ingress calls engine replicas over Ray Serve's inter-deployment gRPC (handles with "
        "_by_reference=False) instead of Ray actor calls: less CPU per request and per streamed message in the "
        "ingress and the engine replica, which on a CPU-bound machine is CPU the engine gets back.",
    )
    ingress_in_engine: bool = Field(
        default=True,
        description="Ignored: the stable slot's engine replicas always answer HTTP and route (one app layout for "
        "serving and every rollout strategy). Accepted so that rayloop.yaml files that set it still load.",
    )
    api_keys_env: str = Field(default="RAYLOOP_API_KEYS", description="Env var with comma-separated bearer tokens.")
    api_keys_file: str | None = Field(default=None, description="File with one bearer token per line.")
    auth: Literal["api_keys", "none"] = Field(
        default="api_keys",
        description="'api_keys': requests need a configured bearer key; with no key configured the API only "
        "starts on a loopback http_host (127.0.0.1, ::1, localhost). 'none': no authentication on any address "
        "(said explicitly; every start logs a warning when the address is not loopback).",
    )
    metrics: bool = Field(
        default=True,
        description="Export request, traffic and swap metrics and vLLM's engine statistics to Ray's Prometheus "
        "endpoint (see docs/monitoring.md).",
    )
    capture: bool = Field(default=True, description="Record every interaction to the interaction store.")
    capture_scrub_pii: bool = Field(
        default=False,
        description="Replace e-mail addresses, phone numbers and API-key-like strings in messages, prompts, "
        "completions and corrections before they are stored (preprocessing scrubs training data either way).",
    )
    no_capture_api_keys_env: str = Field(
        default="RAYLOOP_NO_CAPTURE_API_KEYS",
        description="Env var with comma-separated bearer keys that are accepted like the others but whose "
        "requests are never recorded (nor their feedback). A request opts out alone with the header "
        "x-rayloop-capture: off.",
    )
    capture_batch_rows: int = Field(
        default=256, ge=1, description="Rows per Parquet file written by the capture writer."
    )
    capture_flush_s: float = Field(
        default=2.0,
        gt=0,
        description="Longest time, in seconds, between two writes of the capture writer's buffer to storage "
        "(replicas hand their rows to the writer, which logs them ahead on its node's disk: at once with "
        "capture_ack, else every 0.5 s at most).",
    )
    capture_ack: bool = Field(
        default=True,
        description="A response completes only once the capture writer holds its interaction row (in its journal "
        "on the head's disk), so a replica's node that dies cannot take with it the row of a request its client "
        "saw succeed. Costs one round trip to the writer per request, shared by the requests in flight. false: "
        "rows go out every 0.5 s, and a dying node loses up to that much.",
    )
    capture_ack_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Longest wait for that acknowledgement; past it the response completes and the row stays "
        "queued for a later shipment.",
    )
    capture_max_buffer: int = Field(default=10_000, ge=1, description="Rows buffered before new ones are dropped.")
    capture_batch_bytes: int = Field(
        default=8 << 20,
        ge=1,
        description="Bytes (UTF-8 size of a row's strings, 8 per other value) buffered for one partition before "
        "the capture writer writes them, even below capture_batch_rows; each replica's client ships at this size.",
    )
    capture_max_buffer_bytes: int = Field(
        default=64 << 20,
        ge=1,
        description="Bytes buffered at each end of capture. A replica's client drops (and counts) new rows past "
        "it; the writer writes every partition it holds (to storage, or to the journal) instead.",
    )
    capture_write_attempts: int = Field(
        default=5,
        ge=1,
        description="Attempts per storage write of the capture writer (disk full, S3 5xx, timeout) before the rows "
        "go to the local journal. While storage is down, each later write gets one attempt.",
    )
    capture_retry_base_s: float = Field(
        default=0.2, ge=0, description="Seconds before the capture writer's first retry; doubled each attempt."
    )
    capture_retry_max_s: float = Field(
        default=5.0, ge=0, description="Upper bound, in seconds, of one backoff between capture write attempts."
    )
    capture_journal_dir: str | None = Field(
        default=None,
        description="Local directory, on the capture writer's node, holding rows that storage refused; they are "
        "written to storage on the next successful flush. One subdirectory per storage root. "
        "Default: $RAYLOOP_HOME/capture-journal if RAYLOOP_HOME is an absolute path, else "
        "<temp dir>/rayloop-capture-journal. On a multi-node cluster, a persistent volume keeps it past a node.",
    )
    capture_journal_max_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="Bytes (compressed Parquet) the capture journal may hold; rows that would pass it are dropped "
        "and counted. 0: no journal, rows storage refused are dropped.",
    )
    engine: EngineSettings = Field(
        default_factory=EngineSettings, description="The vLLM engine of each serving replica."
    )

    @property
    def max_replicas(self) -> int:
        """The most replicas one active slot may have (fixed ``replicas``, or the autoscaler's maximum)."""
        return self.replicas if self.autoscaling is None else self.autoscaling.max_replicas

    def replica_count(self) -> dict[str, Any]:
        """The replica-count part of an active slot's Serve deployment options."""
        if self.autoscaling is None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": self.autoscaling.serve_config()}

    @property
    def base_url(self) -> str:
        """HTTP root of the served application (``{base_url}/v1/chat/completions``)."""
        return f"http://{self.http_host}:{self.http_port}{self.route_prefix.rstrip('/')}"


class ExternalData(_Model):
    path: str = Field(
        description="A JSONL or Parquet file of chat, prompt/completion or question/answer records "
        "(local path or object-store URI)."
    )
    weight: float = Field(
        default=1.0, ge=0, description="Rows of this file mixed in per captured training row (sampled by content hash)."
    )


class DataSettings(_Model):
    unrated: UnratedPolicy = Field(default=UnratedPolicy.DROP, description="What to do with rows nobody rated.")
    min_positive_rating: int = Field(default=1, description="Ratings >= this keep the completion; below drop the row.")
    replay_ratio: float = Field(
        default=2.0, ge=0, description="Rows of the parent's training data mixed in per new row (forgetting guard)."
    )
    eval_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Fraction of rows held out for evaluation, chosen by hash of request id."
    )
    max_tokens: int = Field(default=256, ge=8, description="Drop rows longer than this many tokens after tokenization.")
    block_size: int = Field(default=64, ge=8, description="Packed training block length in tokens.")
    external: list[ExternalData] = Field(
        default_factory=list,
        description="Training data beside the captured interactions, each file with its mixing weight; recorded "
        "in the snapshot's manifest (path, fingerprint, rows used).",
    )
    retention_days: int | None = Field(
        default=None,
        ge=1,
        description="Captured interactions, feedback and shadow pairs older than this many days are deleted by "
        "`rayloop data prune` and by the pipeline before it collects. None: kept until deleted by hand.",
    )
    pack_examples: bool = Field(
        default=False,
        description="Pack several examples into one block (denser, but without a varlen attention kernel they "
        "attend to each other). Off: one example per block, padded.",
    )


class TrainingSettings(_Model):
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers.")
    worker_num_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How Ray places the training workers: PACK fills a node first (fast collectives), SPREAD "
        "puts them on different nodes where it can (a lost node costs fewer workers); STRICT_ variants refuse "
        "to start otherwise.",
    )
    data_num_cpus: float = Field(
        default=0.1,
        gt=0,
        description="CPUs each Ray Data read task of the training set asks for (small: Serve may hold the rest).",
    )
    use_gpu: bool = Field(default=False, description="Train on GPUs (NCCL) instead of CPU (gloo).")
    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    bf16: bool | None = Field(
        default=None,
        description="bf16 mixed precision. None = auto: on with GPUs, off on CPU, where bf16 matmuls are emulated "
        "(far slower than fp32) unless the CPU has AVX512-BF16 or AMX.",
    )
    micro_batch_size: int = Field(default=8, ge=1, description="Blocks per worker per step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro steps per optimizer step.")
    learning_rate: float = Field(default=2e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup steps.")
    epochs: int = Field(
        default=12,
        ge=1,
        description="Passes over the training snapshot.",
    )
    checkpoint_every: int = Field(default=50, ge=1, description="Checkpoint every N optimizer steps.")
    max_failures: int = Field(default=2, ge=0, description="Worker-group restarts before the run fails.")
    start_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="How long the worker group may wait for room on the cluster each time it (re)starts, for "
        "example after a node died (on an autoscaling cluster: long enough for a node to join).",
    )
    max_start_failures: int = Field(
        default=2,
        ge=0,
        description="Starts of the worker group that may time out before the run fails: a run never waits for "
        "resources without end.",
    )
    seed: int = Field(default=0, description="Random seed.")


class GateSettings(_Model):
    min_improvement: float = Field(
        default=0.2, description="Accuracy (0-1) by which the candidate must beat production on the improve_on sets."
    )
    max_regression: float = Field(
        default=0.1, ge=0, description="Largest accuracy drop (0-1) tolerated on each protect set."
    )
    require_golden: bool = Field(default=True, description="All golden prompts must pass.")
    improve_on: list[str] = Field(
        default=["eval_split", "new_facts"],
        description="Evaluation sets whose mean accuracy must improve by min_improvement (those present are used).",
    )
    protect: list[str] = Field(
        default=["known_facts", "regression"],
        description="Evaluation sets that must not regress beyond max_regression.",
    )
    eval_sets: list[str] = Field(
        default_factory=list,
        description="Evaluation set files (JSON Lines of {prompt, reference, match, target}; local or object "
        "storage), each a set named after its file, judged beside the sets stored under evalsets/<model>/.",
    )
    max_tokens: int = Field(default=32, ge=1, description="Tokens generated per evaluation prompt (greedy decoding).")
    eval_num_cpus: float = Field(default=0.5, gt=0, description="CPUs reserved by each Ray Data inference actor.")


class RolloutSettings(_Model):
    strategy: Strategy = Field(default=Strategy.CANARY, description="Default update strategy.")
    canary_steps: list[int] = Field(default=[5, 25, 50, 100], description="Canary traffic percentages, ascending.")
    interval_s: float = Field(default=30.0, gt=0, description="Seconds at each canary step before judging it.")
    hold_s: float = Field(default=60.0, ge=0, description="Blue-green: seconds blue is kept warm after the switch.")
    shadow_fraction: float = Field(default=1.0, gt=0, le=1, description="Shadow: fraction (0-1] of requests mirrored.")
    shadow_duration_s: float = Field(default=60.0, gt=0, description="Shadow: seconds to mirror.")
    max_error_rate_delta: float = Field(
        default=0.02, ge=0, description="Canary error rate (a fraction) may exceed stable's by this much."
    )
    max_p95_latency_ratio: float = Field(
        default=1.5, gt=0, description="Canary p95 latency may be this times stable's."
    )
    min_feedback_delta: float = Field(
        default=-0.1, description="Canary mean rating minus stable's must be at least this."
    )
    min_samples: int = Field(
        default=20,
        ge=1,
        validation_alias=AliasChoices("min_samples", "min_requests_per_step"),
        description="Requests (shadow: mirrored pairs) a step needs before it can pass; fewer is inconclusive. "
        "Also read as min_requests_per_step.",
    )
    min_ratings_per_step: int = Field(
        default=10, ge=1, description="Compare feedback only with this many ratings on each side."
    )
    latency_slack_ms: float = Field(
        default=50.0, ge=0, description="Canary p95 may also exceed stable's by this many ms (jitter floor)."
    )
    max_step_wait_factor: float = Field(
        default=3.0,
        ge=1,
        description="A step short of samples waits up to this many intervals (its progress deadline unless "
        "progress_deadline_s is set), then it is inconclusive.",
    )
    progress_deadline_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a canary step or a shadow run may take while it waits for min_samples "
        "(default: max_step_wait_factor x its interval); then it is inconclusive.",
    )
    initial_delay_s: float | None = Field(
        default=None,
        ge=0,
        description="Seconds after a traffic change before its requests count (queues settle); default: a tenth "
        "of the step's interval, at most 5 s.",
    )
    failure_limit: int = Field(
        default=0,
        ge=0,
        description="Failed judgements a step tolerates; one more rolls back (0: the first failed check does).",
    )
    consecutive_error_limit: int = Field(
        default=4,
        ge=0,
        description="Measurements in a row that may fail (stats actor unreachable) before the step is "
        "inconclusive; a successful one resets the count.",
    )
    inconclusive: Literal["rollback", "hold"] = Field(
        default="rollback",
        description="What an inconclusive step does: roll back, or hold where it is (traffic unchanged, never "
        "promoted) until `rayloop promote` or `rayloop abort`.",
    )
    lease_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a rollout controller's ownership lasts without renewal (it renews every third of "
        "that); another controller takes a rollout over only after its lease expired.",
    )
    dry_run: bool = Field(
        default=False,
        description="Analyse and record every verdict, but act on none: failed and inconclusive steps are logged "
        "(events dry_run_breach / dry_run_inconclusive) and the rollout goes on.",
    )
    shadow_max_in_flight: int = Field(
        default=8, ge=1, description="Shadow copies in flight per stable replica; more are skipped, never queued."
    )
    ready_timeout_s: float = Field(
        default=600.0, gt=0, description="How long a slot may take to load a version before the rollout fails."
    )
    placement_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="How long a replica of a slot the rollout waits for may go without starting on a node "
        "(Serve has not placed it: no node has room, an autoscaled node is still coming, its runtime env is "
        "still being set up) before the step fails and the rollout rolls back. Unset: only ready_timeout_s "
        "bounds the wait. Set it well below ready_timeout_s on a cluster without an autoscaler, where a "
        "replica that found no room after a node was lost will not find it later.",
    )
    keep_warm_slots: bool = Field(
        default=False,
        description="Keep the engine of a canary/green/shadow slot loaded after its rollout (serving nothing): "
        "the next rollout swaps its version's weights into that engine instead of starting a new engine, which "
        "takes far longer. The slot keeps its CPUs/GPUs and memory meanwhile; turning this off releases "
        "them at the next rollout.",
    )

    @field_validator("canary_steps")
    @classmethod
    def _check_steps(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("canary_steps is empty; give percentages such as [5, 25, 50, 100]")
        if any(s <= 0 or s > 100 for s in v):
            raise ValueError(f"canary_steps {v} must be percentages in 1..100")
        if v != sorted(set(v)):
            raise ValueError(f"canary_steps {v} must be strictly increasing")
        if v[-1] != 100:
            raise ValueError(f"canary_steps {v} must end at 100 (full rollout)")
        return v


class PipelineSettings(_Model):
    model: str = Field(default="demo", description="Registry model the pipeline improves.")
    base: str | None = Field(default=None, description="Version to retrain from (default: MODEL@production).")
    min_feedback: int = Field(default=20, ge=1, description="Feedback rows needed before a run starts.")
    deploy: bool = Field(default=True, description="Roll an accepted candidate out; False stops after the gate.")
    strategy: Strategy | None = Field(default=None, description="Rollout strategy (default: rollout.strategy).")
    watch_interval_s: float = Field(default=60.0, gt=0, description="`pipeline watch`: seconds between checks.")
    run_every_s: float | None = Field(
        default=None,
        gt=0,
        description="`pipeline watch`: also run once this long has passed since the last run (or the start) "
        "if any new feedback arrived, even below min_feedback. None: on the threshold only.",
    )


class MonitoringSettings(_Model):
    scrape_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="Scrape and rule-evaluation interval, in seconds, of the Prometheus config `rayloop up` writes "
        "to $RAYLOOP_HOME/monitoring/prometheus.yml.",
    )
    registry_poll_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds between the serving replicas' reads of the registry for the rollout and gate metrics.",
    )
    console_app_name: str = Field(default="rayloop-console", description="Serve application of the web console.")
    console_route_prefix: str = Field(
        default="/console", description="HTTP route of the web console on the Serve proxy (`rayloop console`)."
    )
    console_num_cpus: float = Field(default=0.1, gt=0, description="CPUs reserved by the console's replica.")
    console_session_hours: float = Field(
        default=12.0, gt=0, description="How long a console sign-in (its session cookie) lasts, in hours."
    )


class Settings(_Model):
    """All rayloop settings. Build with :func:`load_settings`."""

    home: str = Field(default=".rayloop", description="Root of the embedded default ($RAYLOOP_HOME).")
    storage: StorageSettings = Field(
        default_factory=StorageSettings, description="Where artifacts, captured interactions and snapshots are stored."
    )
    registry: RegistrySettings = Field(default_factory=RegistrySettings, description="The model registry's database.")
    ray: RaySettings = Field(
        default_factory=RaySettings,
        description="The Ray cluster: the one to attach to, or the local head `rayloop up` starts.",
    )
    serving: ServingSettings = Field(
        default_factory=ServingSettings,
        description="The OpenAI-compatible HTTP API on Ray Serve, and interaction capture.",
    )
    data: DataSettings = Field(
        default_factory=DataSettings, description="Turning captured interactions and feedback into training data."
    )
    training: TrainingSettings = Field(
        default_factory=TrainingSettings, description="Retraining with Ray Train and DeepSpeed."
    )
    gate: GateSettings = Field(
        default_factory=GateSettings, description="Evaluation gate a candidate must pass before it is rolled out."
    )
    rollout: RolloutSettings = Field(
        default_factory=RolloutSettings,
        description="Rolling a new version out: strategies and the checks that promote or roll back.",
    )
    pipeline: PipelineSettings = Field(
        default_factory=PipelineSettings,
        description="`rayloop pipeline run/watch`: retrain from new feedback, gate the candidate, roll it out.",
    )
    monitoring: MonitoringSettings = Field(
        default_factory=MonitoringSettings,
        description="Prometheus scrape config, alert rules and Grafana dashboard (docs/monitoring.md).",
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        home = Path(self.home).expanduser()
        if self.storage.root is None:
            self.storage.root = str((home / "storage").absolute())
        if self.registry.url is None:
            self.registry.url = f"sqlite:///{(home / 'registry.db').absolute()}"
        return self

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().absolute()

    @property
    def node_path(self) -> Path:
        """This node's own directory for what each node keeps apart (the model cache, the capture journal):
        ``$RAYLOOP_NODE_DIR`` of the process asking, where the node sets it, else :attr:`home_path`.

        Settings travel from the driver to replicas and tasks on other nodes, so ``home`` there is the head's
        path. Where every node has that path (KubeRay pods, one machine) nothing needs setting; where it does
        not, start each node with ``RAYLOOP_NODE_DIR`` in its environment (``ray start`` passes it on to the
        node's workers).
        """
        node_dir = os.environ.get(NODE_DIR_ENV)
        return Path(node_dir).expanduser().absolute() if node_dir else self.home_path

    @property
    def base_model_path(self) -> Path:
        """Where `rayloop init` builds the base model (the default parent to train from)."""
        return self.home_path / "base-model"

    @property
    def storage_root(self) -> str:
        assert self.storage.root is not None  # filled by the validator
        return self.storage.root

    @property
    def registry_url(self) -> str:
        """``registry.url`` as configured (``rayloop.registry.database_url`` adds a stored password)."""
        assert self.registry.url is not None  # filled by the validator
        return self.registry.url

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def redacted(self) -> dict[str, Any]:
        """:meth:`dump` with every password in a URL replaced by ``***`` (what `rayloop config show` prints)."""
        out = self.dump()
        for section, key in (("registry", "url"), ("storage", "root"), ("storage", "s3_endpoint"), ("ray", "address")):
            value = out.get(section, {}).get(key)
            if isinstance(value, str):
                out[section][key] = redact_url(value)
        return out


def url_password(url: str) -> str | None:
    """The (decoded) password in ``url``, or None."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return None if password is None else unquote(password)


def with_password(url: str, password: str | None) -> str:
    """``url`` with its password replaced (None: removed)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    user = quote(parts.username or "", safe="")
    userinfo = user + (f":{quote(password, safe='')}" if password is not None else "")
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}" if userinfo else host))


def redact_url(url: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://user:***@host/...``; anything else unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    userinfo = f"{parts.username}:***" if parts.username else "***"
    return urlunsplit(
        parts._replace(netloc=f"{userinfo}@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else ""))
    )


# --- where a value came from ---------------------------------------------------

ENV_PREFIX = "RAYLOOP_"
ENV_NESTED_DELIMITER = "__"

# Variables rayloop read before every setting had one of its own: name -> path of the setting. The
# RAYLOOP_SECTION__KEY variable of the same setting wins where both are set.
LEGACY_ENV_VARS: dict[str, tuple[str, ...]] = {
    "RAYLOOP_STORAGE": ("storage", "root"),
    "RAYLOOP_S3_ENDPOINT": ("storage", "s3_endpoint"),
    "RAYLOOP_REGISTRY_URL": ("registry", "url"),
    "RAY_ADDRESS": ("ray", "address"),
}

_KeyPath = tuple[str, ...]


def _field_of(model: type[BaseModel] | None, key: object) -> tuple[str | None, type[BaseModel] | None]:
    """The field of ``model`` that ``key`` names (by name or validation alias), and its model if it is a section."""
    if model is None or not isinstance(key, str):
        return None, None
    for name, field in model.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        if key == name or key in choices:
            ann = field.annotation
            return name, ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return None, None


def _canonical(data: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """``data`` with each validation alias renamed to its field (``min_requests_per_step`` -> ``min_samples``).

    Layers then merge key by key: an env var spelled with the alias overrides the file's ``min_samples``.
    Within one layer, the field's own name wins over an alias (pydantic's AliasChoices order).
    """
    model = Settings if model is None else model
    out: dict[str, Any] = {}
    aliased: list[tuple[str, Any]] = []
    for key, value in data.items():
        name, section = _field_of(model, key)
        if isinstance(value, dict) and section is not None:
            value = _canonical(value, section)
        if name is None or name == key:
            out[key] = value
        else:
            aliased.append((name, value))
    for name, value in aliased:
        out.setdefault(name, value)
    return out


def _canonical_path(parts: list[str]) -> _KeyPath:
    model: type[BaseModel] | None = Settings
    out = []
    for part in parts:
        name, model = _field_of(model, part)
        out.append(name or part)
    return tuple(out)


def _leaves(data: dict[str, Any], prefix: _KeyPath = ()) -> list[_KeyPath]:
    out: list[_KeyPath] = []
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, path))
        else:
            out.append(path)
    return out


def _overlaps(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


# Where a value came from: a label for messages ("rayloop.yaml", "environment variable RAYLOOP_X",
# "overrides"), and whether that label already names the setting (an env var of that very setting).
_Origin = tuple[str, bool]


def _claim(owners: dict[_KeyPath, _Origin], data: dict[str, Any], source: str | dict[_KeyPath, str]) -> None:
    """Record that the values in ``data``, merged over those ``owners`` describes, come from ``source``.

    ``source`` is a label for every value, or a map from a path to the env var that gave it (the longest
    path that is a prefix of a value's path: ``RAYLOOP_SERVING='{...}'`` gives all of serving).
    """
    for leaf in _leaves(data):
        for old in [p for p in owners if _overlaps(p, leaf)]:
            del owners[old]
        if isinstance(source, str):
            owners[leaf] = (source, False)
            continue
        given = max((p for p in source if leaf[: len(p)] == p), key=len, default=None)
        if given is None:
            owners[leaf] = ("the environment", False)
        else:
            owners[leaf] = (f"environment variable {source[given]}", given == leaf)


def _sources_of(loc: tuple[Any, ...], owners: dict[_KeyPath, _Origin]) -> tuple[list[str], bool]:
    """Labels of where the value an error is about came from, and whether the label names that setting."""
    for path, (label, names_setting) in owners.items():
        if loc[: len(path)] == path:  # the error is about this value or inside it
            return [label], names_setting and path == loc
    # A check over several values (a model validator): every source of a value under loc.
    labels = [label for path, (label, _) in owners.items() if path[: len(loc)] == loc]
    return list(dict.fromkeys(labels)) or ["defaults"], False


def _format_validation_error(err: ValidationError, source: str | dict[_KeyPath, _Origin]) -> str:
    """One line naming, for each error, where the bad value came from (a file, an env var, overrides)."""
    owners: dict[_KeyPath, _Origin] = {(): (source, False)} if isinstance(source, str) else source
    groups: dict[str, list[str]] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        labels, named = _sources_of(loc, owners)
        if e["type"] == "extra_forbidden":
            text = f"unknown key {dotted!r}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            # An env var of the setting names it already; a file, overrides or a JSON section need the key path.
            text = msg if named else f"{dotted}: {msg}"
            if not isinstance(e.get("input"), dict):
                text += f" (got {e.get('input')!r})"
        groups.setdefault(" and ".join(labels), []).append(text)
    return "invalid settings in " + "; in ".join(f"{label}: " + "; ".join(texts) for label, texts in groups.items())


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# --- environment variables -----------------------------------------------------


def _read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested settings from ``RAYLOOP_*`` variables, read by pydantic-settings' ``EnvSettingsSource``.

    The library does the parsing: it matches ``RAYLOOP_<FIELD>`` and ``RAYLOOP_<SECTION>__<KEY>...``
    case-insensitively against the fields of :class:`Settings` and its sections (validation aliases
    included), builds the nested dict, decodes JSON for lists, mappings and whole sections, turns
    ``null`` into None and skips empty variables. Values stay strings; :class:`Settings` validates
    them with the file's values, so one model checks every source. ``Settings`` stays a plain model
    (constructing it never reads the process environment); the source reads the mapping given here.
    """
    from pydantic_settings import EnvSettingsSource
    from pydantic_settings.sources.utils import parse_env_vars

    class _Source(EnvSettingsSource):
        def _load_env_vars(self) -> Mapping[str, str | None]:
            return parse_env_vars(environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    source = _Source(
        cast(Any, Settings),  # typed for BaseSettings; it reads only model_fields and model_config
        case_sensitive=False,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_ignore_empty=True,
        env_parse_none_str="null",
    )
    return source()


def _env_layer(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[_KeyPath, str]]:
    """Settings given by environment variables, and the variable that gave each path."""
    from pydantic_settings import SettingsError

    ours = {k: v for k, v in env.items() if k.upper().startswith(ENV_PREFIX) and k.upper() not in LEGACY_ENV_VARS}
    try:
        data = _canonical(_read_env(ours))
    except SettingsError:
        # A list, mapping or section that is not JSON: find the variable (one at a time) to name it.
        for name in sorted(ours):
            try:
                _read_env({name: ours[name]})
            except SettingsError as e:
                raise ConfigError(
                    f"invalid settings in environment variable {name}: not valid JSON ({e.__cause__}) "
                    f"(got {ours[name]!r})",
                    hint="Lists and mappings are written as JSON, e.g. RAYLOOP_ROLLOUT__CANARY_STEPS='[10, 50, 100]'.",
                ) from None
        raise
    given: dict[_KeyPath, str] = {}
    legacy: dict[str, Any] = {}
    for name, path in LEGACY_ENV_VARS.items():
        if env.get(name):
            legacy = _deep_merge(legacy, {path[0]: {path[1]: env[name]}})
            given[path] = name
    for name, value in ours.items():
        path = _canonical_path(name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER))
        if value != "" and path[0] in Settings.model_fields:
            given[path] = name
    return _deep_merge(legacy, data), given


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"settings file {str(p)!r} does not exist", hint="Pass an existing file to --config.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"settings file {str(p)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {str(p)!r} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def settings_from_dict(data: dict[str, Any], source: str = "settings") -> Settings:
    return _validate(data, source)


def _validate(data: dict[str, Any], source: str | dict[_KeyPath, _Origin]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_settings(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Resolve settings from defaults < a YAML file < env vars < explicit overrides.

    ``env`` replaces ``os.environ`` (only it is read); the file is ``path``, else ``$RAYLOOP_CONFIG``,
    else ``./rayloop.yaml`` if it exists. An invalid value is reported with its source: the file and
    key path, the environment variable, or the overrides.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get("RAYLOOP_CONFIG") or ("rayloop.yaml" if Path("rayloop.yaml").is_file() else None)
    owners: dict[_KeyPath, _Origin] = {}
    data: dict[str, Any] = {}
    if path is not None:
        data = _canonical(load_yaml(path))
        _claim(owners, data, str(path))
    env_data, env_vars = _env_layer(env)
    _claim(owners, env_data, env_vars)
    data = _deep_merge(data, env_data)
    if overrides:
        over = _canonical(overrides)
        _claim(owners, over, "overrides")
        data = _deep_merge(data, over)
    return _validate(data, owners)


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of ``rayloop.yaml``, for editors and CI checks (``rayloop config schema``)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **Settings.model_json_schema()}
