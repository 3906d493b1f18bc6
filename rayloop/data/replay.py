"""Replay sources: a sample of the parent version's training data.

Fine-tuning a small model on new interactions alone makes it forget what it
knew; mixing in rows it was trained on before guards against that. A replay
source is either

- a list of ``(question, answer)`` pairs: a model directory's ``replay.jsonl``
  (:meth:`ReplaySource.from_model_dir`; records as :mod:`rayloop.data.records`
  reads them: the demo base model ships its pre-training set there), or
- a previous snapshot, whose ``train/pairs`` are sampled (the data the parent
  version was fine-tuned on).

The sample is deterministic: rows are ranked by a hash of their content and
the first ``n`` taken (a list is cycled when more rows are asked for than it
holds), so the same inputs give the same snapshot.

    >>> src = ReplaySource.from_pairs([("Q?", "A.")], name="toy")
    >>> src.describe()["kind"]
    'pairs'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rayloop.errors import DataError

REPLAY_FILE = "replay.jsonl"  # in a model directory: records of what the model was trained on


class ReplaySource(BaseModel):
    """Where replay rows come from; recorded in the snapshot manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pairs", "snapshot"] = Field(description="A list of (question, answer) pairs or a previous snapshot.")
    name: str = Field(default="", description="Human-readable origin, e.g. the parent model ref or a path.")
    pairs: list[tuple[str, str]] = Field(default_factory=list, description="kind=pairs: the (question, answer) pairs.")
    snapshot_id: str | None = Field(default=None, description="kind=snapshot: id of the snapshot to sample.")

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]], *, name: str = "pairs") -> ReplaySource:
        if not pairs:
            raise DataError(
                "the replay source has no pairs", hint="Pass at least one (question, answer) pair, or no replay."
            )
        return cls(kind="pairs", name=name, pairs=[(str(q), str(a)) for q, a in pairs])

    @classmethod
    def from_snapshot(cls, snapshot_id: str) -> ReplaySource:
        return cls(kind="snapshot", name=f"snapshot:{snapshot_id}", snapshot_id=snapshot_id)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ReplaySource | None:
        """The pairs a model directory ships in ``replay.jsonl`` (what it was trained on), or None."""
        from rayloop.data.records import read_pairs

        p = Path(model_dir) / REPLAY_FILE
        if not p.is_file():
            return None
        return cls.from_pairs(read_pairs(str(p.absolute())), name=f"{REPLAY_FILE}:{model_dir}")

    def fingerprint(self) -> str:
        if self.kind == "snapshot":
            return f"snapshot:{self.snapshot_id}"
        blob = json.dumps(sorted(self.pairs)).encode()
        return "pairs:" + hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "fingerprint": self.fingerprint()}
        if self.kind == "pairs":
            out["available"] = len(self.pairs)
        else:
            out["snapshot_id"] = self.snapshot_id
        return out


def rank_key(question: str, answer: str) -> str:
    return hashlib.sha256(f"replay\0{question}\0{answer}".encode()).hexdigest()


def sample_pairs(pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """``n`` pairs ranked by content hash; cycles through the list when n exceeds it."""
    if n <= 0 or not pairs:
        return []
    ranked = sorted(pairs, key=lambda p: rank_key(*p))
    full, rest = divmod(n, len(ranked))
    return ranked * full + ranked[:rest]


def replay_for_model_dir(model_dir: str | Path) -> ReplaySource | None:
    """The parent's own training data: the snapshot it was fine-tuned on, else the pairs it ships."""
    p = Path(model_dir) / "rayloop_training.json"
    if p.is_file():
        sid = json.loads(p.read_text()).get("snapshot_id")
        if sid:
            return ReplaySource.from_snapshot(sid)
    return ReplaySource.from_model_dir(model_dir)
