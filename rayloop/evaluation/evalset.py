"""Evaluation sets: what a candidate is measured on before it may deploy.

An evaluation set is a named list of :class:`EvalItem` (a chat prompt, the
reference that must appear in a correct answer, and optionally the full target
answer used for loss/perplexity). They come from three places:

- the snapshot's held-out eval split (questions users asked, with the answer
  their feedback says is right);
- fixed sets stored per model under ``evalsets/<model>/<set>.jsonl`` in
  storage: the regression set (what must not be forgotten) and golden prompts
  (each must pass);
- for the demo task, the world's held-out phrasings of new and known facts.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Literal

from rayloop.demo.world import World
from rayloop.errors import EvaluationError
from rayloop.storage import Storage

Match = Literal["word", "exact", "contains"]
EVALSETS_DIR = "evalsets"


@dataclass(frozen=True)
class EvalItem:
    set: str
    prompt: str
    reference: str
    match: Match = "word"
    target: str | None = None

    def is_correct(self, output: str) -> bool:
        out = output.strip()
        if self.match == "exact":
            return out == self.reference.strip()
        if self.match == "contains":
            return self.reference.strip() in out
        return re.search(rf"\b{re.escape(self.reference)}\b", out) is not None


def demo_eval_sets(world: World, n_golden: int = 3) -> dict[str, list[EvalItem]]:
    """Held-out phrasings of new facts (to improve) and known facts (to keep), plus golden prompts."""

    def items(split: Literal["known", "new"], name: str) -> list[EvalItem]:
        out = []
        for q in world.eval_questions(split):
            fact = world.fact(q.fact_id)
            out.append(EvalItem(name, q.prompt, q.answer, "word", fact.answer()))
        return out

    known = items("known", "known_facts")
    golden = [EvalItem("golden", i.prompt, i.reference, "word", i.target) for i in known[:n_golden]]
    return {"new_facts": items("new", "new_facts"), "known_facts": known, "golden": golden}


def save_eval_set(storage: Storage, model: str, name: str, items: list[EvalItem]) -> str:
    key = f"{EVALSETS_DIR}/{model}/{name}.jsonl"
    storage.write_bytes(key, "".join(json.dumps(asdict(i)) + "\n" for i in items).encode())
    return key


def load_eval_sets(storage: Storage, model: str) -> dict[str, list[EvalItem]]:
    """All fixed sets stored for ``model`` (may be empty)."""
    out: dict[str, list[EvalItem]] = {}
    for key in sorted(storage.list(f"{EVALSETS_DIR}/{model}")):
        if not key.endswith(".jsonl"):
            continue
        name = key.rsplit("/", 1)[-1].removesuffix(".jsonl")
        items = []
        for n, line in enumerate(storage.read_bytes(key).decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(EvalItem(**json.loads(line)))
            except (ValueError, TypeError) as e:
                raise EvaluationError(
                    f"evaluation set {storage.uri_of(key)!r} line {n} is not a valid item: {e}",
                    hint='Each line must be JSON like {"set": "golden", "prompt": "...", "reference": "..."}.',
                ) from None
        out[name] = items
    return out
