"""Schemas and layout of the interaction store.

Everything lives under the storage root (``Settings.storage_root``)::

    interactions/date=YYYY-MM-DD/model=NAME/version=N/part-<uuid>.parquet
    feedback/date=YYYY-MM-DD/part-<uuid>.parquet
    shadow/date=YYYY-MM-DD/model=NAME/part-<uuid>.parquet
    snapshots/<snapshot_id>/{train,eval}/*.parquet + manifest.json
    models/NAME/<version>/...            (the registry's artifacts)

Partition columns (``date``, ``model``, ``version``) are in the path only, in
Hive style, so ``ray.data.read_parquet(..., partitioning="hive")`` and
``pyarrow.dataset`` recover them. Rows carry ``model_name``/``model_version``
as ordinary columns too, so a file read on its own is still complete.
"""

from __future__ import annotations

import pyarrow as pa

INTERACTIONS_DIR = "interactions"
FEEDBACK_DIR = "feedback"
SHADOW_DIR = "shadow"
SNAPSHOTS_DIR = "snapshots"

INTERACTION_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("session_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.int64(), nullable=False),
        pa.field("slot", pa.string()),  # stable / canary (also blue-green's green); shadow copies are in shadow/
        pa.field("endpoint", pa.string(), nullable=False),  # "chat" or "completion"
        pa.field("messages", pa.string()),  # chat: JSON list of {role, content}
        pa.field("prompt", pa.string()),  # completion: the raw prompt
        pa.field("completion", pa.string()),  # the first choice's text
        pa.field("choices", pa.string()),  # JSON list of every choice's text, when there were several (n > 1)
        pa.field("sampling_params", pa.string()),  # JSON
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("latency_ms", pa.float64()),
        pa.field("ttft_ms", pa.float64()),
        pa.field("status", pa.string(), nullable=False),  # "ok", "client_error" or "error" (serving.ingress.row_status)
        pa.field("error", pa.string()),
        pa.field("finish_reason", pa.string()),
    ]
)

FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("rating", pa.int8()),  # -1 bad, 0 neutral, +1 good
        pa.field("correction", pa.string()),  # what the answer should have been
        pa.field("user_id", pa.string()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.int64()),
    ]
)

SHADOW_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("primary_version", pa.int64(), nullable=False),
        pa.field("shadow_version", pa.int64(), nullable=False),
        pa.field("endpoint", pa.string()),
        pa.field("messages", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("primary_completion", pa.string()),
        pa.field("shadow_completion", pa.string()),
        pa.field("primary_latency_ms", pa.float64()),
        pa.field("shadow_latency_ms", pa.float64()),
        pa.field("primary_tokens", pa.int32()),
        pa.field("shadow_tokens", pa.int32()),
        pa.field("shadow_status", pa.string()),
        pa.field("exact_match", pa.bool_()),
        pa.field("similarity", pa.float64()),
    ]
)


def interaction_partition(date: str, model: str, version: int) -> str:
    return f"{INTERACTIONS_DIR}/date={date}/model={model}/version={version}"


def feedback_partition(date: str) -> str:
    return f"{FEEDBACK_DIR}/date={date}"


def shadow_partition(date: str, model: str) -> str:
    return f"{SHADOW_DIR}/date={date}/model={model}"
