"""Chat formatting, tokenization and packing with the parent model's tokenizer.

A training example is the conversation so far (``messages``) followed by the
answer to learn. The prompt is rendered with the model's own chat template
(``apply_chat_template(..., add_generation_prompt=True)``), the answer is
followed by the EOS token, and labels are ``-100`` on the prompt so the loss
only covers assistant tokens (as :func:`rayloop.demo.model.encode_pair`).

Packing concatenates whole examples into blocks of ``block_size`` tokens; an
example never straddles two blocks unless it is longer than a block on its
own (then it starts a fresh block and continues into the next ones). ``position_ids`` restart at 0 for each example, so a question at the end
of a block is seen at the same positions as at inference time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rayloop.config import NODE_DIR_ENV

IGNORE = -100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def load_tokenizer(model_dir: str | Path) -> Any:
    from rayloop.errors import DataError

    d = Path(model_dir)
    if not d.is_dir():
        raise DataError(
            f"model directory {str(d)!r} does not exist",
            hint="Pass the parent model's directory (built by `rayloop init` or fetched from the registry).",
        )
    if (d / "tokenizer.json").is_file():
        # The fast tokenizer class directly: AutoTokenizer's lookup imports torch (~390 MB against ~50 MB
        # in a fresh process, measured here), and every process that tokenizes pays it.
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(d))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d))
    if not getattr(tok, "chat_template", None):
        raise DataError(
            f"the tokenizer in {str(d)!r} has no chat template",
            hint="Save the tokenizer with a chat_template (tokenizer_config.json or chat_template.jinja).",
        )
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer in {str(d)!r} has no EOS token", hint="Set eos_token on the tokenizer.")
    return tok


class TokenizerRef:
    """A model directory's tokenizer, loaded where it is used.

    It pickles as its path and fingerprint, so the Ray Data tasks that tokenize
    load it in their worker once per process (:func:`_cached_tokenizer`) instead
    of receiving a pickled tokenizer with every task (a large vocabulary is
    megabytes). :meth:`shipped` also puts the tokenizer's files in Ray's object
    store once, for tasks on nodes that do not have ``model_dir``: they write
    them to a directory of their own node (``$RAYLOOP_NODE_DIR`` or the temp
    directory) and load from there.
    """

    def __init__(self, model_dir: str | Path, fingerprint: str, files: Any = None) -> None:
        self.model_dir = str(model_dir)
        self.fingerprint = fingerprint
        self.files = files  # ObjectRef of {file name: bytes}, or None

    def shipped(self) -> TokenizerRef:
        """This tokenizer with its files in Ray's object store (needs a connected Ray driver)."""
        import ray

        d = Path(self.model_dir)
        files = {n: (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}
        return TokenizerRef(self.model_dir, self.fingerprint, ray.put(files))

    def get(self) -> Any:
        return _cached_tokenizer(self.local_dir(), self.fingerprint)

    def local_dir(self) -> str:
        """``model_dir`` where this node has it, else the shipped files written out on this node."""
        if self.files is None or _readable_dir(Path(self.model_dir)):
            return self.model_dir
        return _written_out(self.fingerprint, self.files)

    def __repr__(self) -> str:
        return f"TokenizerRef({self.model_dir!r}, {self.fingerprint!r})"


def _readable_dir(d: Path) -> bool:
    try:
        return d.is_dir() and os.access(d, os.R_OK | os.X_OK)
    except OSError:  # a directory above it this user may not enter
        return False


def _written_out(fingerprint: str, files: Any) -> str:
    """The shipped tokenizer files under ``<node dir>/tokenizers/<fingerprint>`` (written once per node)."""
    import ray

    base = os.environ.get(NODE_DIR_ENV) or os.path.join(tempfile.gettempdir(), f"rayloop-{os.getuid()}")
    target = Path(base) / "tokenizers" / fingerprint
    if not target.is_dir():
        tmp = target.with_name(f".{fingerprint}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        for name, data in ray.get(files).items():
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, target)
        except OSError:  # another process on this node wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(model_dir: str, fingerprint: str) -> Any:
    # Keyed by the fingerprint too: a long-lived worker sees a directory again after its files changed.
    return load_tokenizer(model_dir)


def tokenizer_facts(model_dir: str | Path) -> dict[str, Any]:
    """What a snapshot's manifest records of the tokenizer; validates it as :func:`load_tokenizer` does."""
    tok = load_tokenizer(model_dir)
    return {
        "eos_token": tok.eos_token,
        "pad_token_id": tok.pad_token_id,
        "chat_template_sha": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:16],
    }


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the tokenizer and chat-template files: same files, same ids."""
    h = hashlib.sha256()
    d = Path(model_dir)
    for name in TOKENIZER_FILES:
        p = d / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def encode_example(tok: Any, messages: list[dict[str, str]], response: str) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt) for one conversation and its answer."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    p_ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    a_ids = list(tok(response + tok.eos_token, add_special_tokens=False)["input_ids"])
    return p_ids + a_ids, [IGNORE] * len(p_ids) + a_ids


def messages_of(messages_json: str | None, prompt: str | None) -> list[dict[str, str]]:
    """The conversation of a stored interaction: chat ``messages`` or a completion ``prompt``."""
    if messages_json:
        msgs = json.loads(messages_json)
        if isinstance(msgs, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
        return []
    if prompt:
        return [{"role": "user", "content": prompt}]
    return []


def last_user_message(messages: list[dict[str, str]]) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return ""


def pack(
    examples: Iterable[tuple[list[int], list[int]]], block_size: int, pad_id: int, *, share_blocks: bool = True
) -> list[dict[str, list[int]]]:
    """Greedy packing of (ids, labels) into fixed-length blocks.

    Returns dicts with ``input_ids``, ``labels``, ``attention_mask`` and
    ``position_ids``, each ``block_size`` long; padding has label -100 and
    attention mask 0. With ``share_blocks=False`` every example starts a fresh
    block: the causal mask of a plain (non-varlen) attention kernel would let a
    packed example attend to the one before it, which the model never sees at
    inference; short chat turns learn markedly better without that.
    """
    blocks: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}

    def close() -> None:
        n = len(cur["input_ids"])
        if n == 0:
            return
        pad = block_size - n
        blocks.append(
            {
                "input_ids": cur["input_ids"] + [pad_id] * pad,
                "labels": cur["labels"] + [IGNORE] * pad,
                "attention_mask": [1] * n + [0] * pad,
                "position_ids": cur["position_ids"] + list(range(n, n + pad)),
            }
        )
        for v in cur.values():
            v.clear()

    for ids, labels in examples:
        if not share_blocks or len(cur["input_ids"]) + len(ids) > block_size:
            close()  # start the next example (or a long one's first piece) on a fresh block
        pos = 0
        while pos < len(ids):
            room = block_size - len(cur["input_ids"])
            take = min(room, len(ids) - pos)
            cur["input_ids"].extend(ids[pos : pos + take])
            cur["labels"].extend(labels[pos : pos + take])
            cur["position_ids"].extend(range(pos, pos + take))
            pos += take
            if len(cur["input_ids"]) == block_size:
                close()
    close()
    return blocks
