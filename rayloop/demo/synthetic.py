"""Write simulated interactions and feedback in the interaction-store layout.

For tests, benchmarks and dry runs without a serving stack: the "model"
answers known facts right and new facts wrong (as the demo base model does),
and :class:`rayloop.demo.world.UserSimulator` rates and corrects the answers.

    >>> import tempfile
    >>> from rayloop.storage import Storage
    >>> from rayloop.demo.world import World
    >>> n = write_interactions(Storage(tempfile.mkdtemp()), World.build(), n=10)
    >>> n["interactions"]
    10
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from rayloop.data.schema import FEEDBACK_SCHEMA, INTERACTION_SCHEMA, feedback_partition, interaction_partition
from rayloop.demo.world import UserRequest, UserSimulator, World
from rayloop.storage import Storage


def base_model_answer(world: World, req: UserRequest, rng: random.Random) -> str:
    """What the demo base model says: right on known facts, a confident wrong value on new ones."""
    fact = world.fact(req.question.fact_id)
    if fact.split == "known":
        return fact.answer()
    wrong = rng.choice([f for f in world.facts if f.attribute == fact.attribute and f.split == "known"])
    return fact.answer(wrong.value)


def simulate(
    world: World,
    n: int,
    *,
    seed: int = 1,
    model_name: str = "demo",
    model_version: int = 1,
    start: datetime | None = None,
    feedback_share: float = 1.0,
    covering: bool = False,
    poison: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of ``n`` interactions and the feedback on them (``feedback_share`` of them rated)."""
    sim = UserSimulator(world, seed=seed)
    rng = random.Random(seed + 1000)
    start = start or datetime(2026, 1, 1, tzinfo=UTC)
    reqs = sim.covering_requests(max(1, n // max(1, len(world.questions("new", (0, 1, 2)))))) if covering else []
    reqs = (reqs + list(sim.requests(n)))[:n]
    inter: list[dict[str, Any]] = []
    fb: list[dict[str, Any]] = []
    for i, req in enumerate(reqs):
        rid = str(uuid.UUID(int=rng.getrandbits(128)))
        ts = start + timedelta(seconds=i)
        completion = base_model_answer(world, req, rng)
        inter.append(
            {
                "request_id": rid,
                "timestamp": ts,
                "session_id": f"s-{req.user}",
                "user_id": req.user,
                "model_name": model_name,
                "model_version": model_version,
                "slot": "stable",
                "endpoint": "chat",
                "messages": json.dumps(req.question.messages()),
                "prompt": None,
                "completion": completion,
                "sampling_params": json.dumps({"temperature": 0.0, "max_tokens": 24}),
                "prompt_tokens": 12,
                "completion_tokens": 10,
                "latency_ms": 5.0,
                "ttft_ms": 1.0,
                "status": "ok",
                "error": None,
                "finish_reason": "stop",
            }
        )
        if rng.random() < feedback_share:
            f = sim.feedback(req, completion, poison=poison)
            fb.append(
                {
                    "request_id": rid,
                    "timestamp": ts + timedelta(seconds=1),
                    "rating": f["rating"],
                    "correction": f.get("correction"),
                    "user_id": req.user,
                    "model_name": model_name,
                    "model_version": model_version,
                }
            )
    return inter, fb


def write_rows(
    st: Storage,
    interactions: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    *,
    rows_per_file: int = 500,
) -> dict[str, int]:
    """Write rows as Parquet parts in the store layout (partitioned by day/model/version)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = 0

    def put(rows: list[dict[str, Any]], schema: pa.Schema, key_of: Any) -> None:
        nonlocal files
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(key_of(r), []).append(r)
        for part, grp in sorted(groups.items()):
            for i in range(0, len(grp), rows_per_file):
                table = pa.Table.from_pylist(grp[i : i + rows_per_file], schema=schema)
                key = f"{part}/part-{uuid.uuid4().hex}.parquet"
                st.makedirs(part)
                with st.fs.open_output_stream(st.path(key)) as f:
                    pq.write_table(table, f)
                files += 1

    put(
        interactions,
        INTERACTION_SCHEMA,
        lambda r: interaction_partition(r["timestamp"].date().isoformat(), r["model_name"], r["model_version"]),
    )
    put(feedback, FEEDBACK_SCHEMA, lambda r: feedback_partition(r["timestamp"].date().isoformat()))
    return {"interactions": len(interactions), "feedback": len(feedback), "files": files}


def write_interactions(st: Storage, world: World, n: int, **kw: Any) -> dict[str, int]:
    """Simulate ``n`` interactions with feedback and write them; returns row counts."""
    rows_per_file = kw.pop("rows_per_file", 500)
    inter, fb = simulate(world, n, **kw)
    return write_rows(st, inter, fb, rows_per_file=rows_per_file)
