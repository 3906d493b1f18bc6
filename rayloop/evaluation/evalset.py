"""Evaluation sets: what a candidate is measured on before it may deploy.

An evaluation set is a named list of :class:`EvalItem` (a chat prompt, the
reference that must appear in a correct answer, and optionally the full target
answer used for loss/perplexity). They come from three places:

- the snapshot's held-out eval split (questions users asked, with the answer
  their feedback says is right);
- fixed sets stored per model under ``evalsets/<model>/<set>.jsonl`` in
  storage: the regression set (what must not be forgotten) and golden prompts
  (each must pass);
- files named in ``gate.eval_sets`` (JSON Lines, one item a line; the set is named after the file).

Sets from storage and files are written by operators; ``eval_split`` is drawn from user feedback, so
the gate never accepts on it alone (:data:`FEEDBACK_SETS`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Literal

from rayloop.errors import EvaluationError
from rayloop.storage import Storage

Match = Literal["word", "exact", "contains"]
EVALSETS_DIR = "evalsets"
FEEDBACK_SETS = frozenset({"eval_split"})  # drawn from what users sent: they could steer it


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


def _parse_items(text: str, name: str, where: str) -> list[EvalItem]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise TypeError(f"a JSON object, not {type(rec).__name__}")
            rec.setdefault("set", name)
            items.append(EvalItem(**rec))
        except (ValueError, TypeError) as e:
            raise EvaluationError(
                f"evaluation set {where!r} line {n} is not a valid item: {e}",
                hint='Each line must be JSON like {"prompt": "...", "reference": "..."} (match, target optional).',
            ) from None
    if not items:
        raise EvaluationError(f"evaluation set {where!r} holds no items", hint="Give at least one item a line.")
    return items


def load_eval_set_files(paths: list[str], s3_endpoint: str | None = None) -> dict[str, list[EvalItem]]:
    """``gate.eval_sets``: each JSONL file (local or object storage) as a set named after the file."""
    import posixpath

    out: dict[str, list[EvalItem]] = {}
    for path in paths:
        st = Storage(posixpath.dirname(path) or ".", s3_endpoint=s3_endpoint)
        fname = posixpath.basename(path)
        if not st.exists(fname):
            raise EvaluationError(f"evaluation set file {path!r} does not exist", hint="Fix gate.eval_sets.")
        name = fname.removesuffix(".jsonl")
        out[name] = _parse_items(st.read_bytes(fname).decode("utf-8"), name, path)
    return out
