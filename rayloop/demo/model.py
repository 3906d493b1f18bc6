"""Build the demo base model locally: tokenizer, tiny Llama, short pre-training.

Nothing is downloaded. The tokenizer is a byte-level BPE trained with
``tokenizers`` on the world's own text; the model is a Llama architecture
small enough to pre-train on two CPU cores in about a minute, with head_dim 32
(vLLM's CPU attention rejects 16). The output directory is a normal Hugging
Face model directory (safetensors weights) that vLLM and ``transformers`` load.

    python -c "from rayloop.demo.model import build_base_model; build_base_model('/tmp/m')"
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayloop.data.records import write_pairs_jsonl
from rayloop.data.replay import REPLAY_FILE
from rayloop.demo.world import World

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# Jinja chat template: <|bos|><|user|>question<|end|><|assistant|>answer<|end|>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class ModelSpec:
    """Shape of the demo model and its pre-training run."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim 32
    intermediate_size: int = 384
    vocab_size: int = 640
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    steps: int = 700
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0


def train_tokenizer(world: World, vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(world.corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=ROLE_TOKENS
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 256
    return fast


def encode_pair(tok: PreTrainedTokenizerFast, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of one chat turn and its labels (-100 on the prompt part)."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer + EOS, add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def _llama_config(spec: ModelSpec, tok: PreTrainedTokenizerFast) -> Any:
    from transformers import LlamaConfig

    vocab = math.ceil(len(tok) / 64) * 64
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5,
        dtype="float32",
    )


def pretrain(
    model: Any,
    tok: PreTrainedTokenizerFast,
    pairs: list[tuple[str, str]],
    spec: ModelSpec,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Plain single-process PyTorch loop over (question, answer) pairs; returns losses."""
    import torch

    rng = random.Random(spec.seed)
    encoded = [encode_pair(tok, q, a) for q, a in pairs]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    )
    losses: list[float] = []
    model.train()
    for step in range(spec.steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(spec.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if progress is not None:
            progress(step + 1, spec.steps, losses[-1])
    model.eval()
    return losses


def greedy_answers(model_dir: str | Path, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy chat answers with ``transformers`` (slow path, for checks without vLLM)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return [str(tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True)) for row in out]


def build_base_model(
    out_dir: str | Path,
    world: World | None = None,
    spec: ModelSpec | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Write the pre-trained base model to ``out_dir``; returns its build info."""
    import torch
    from transformers import LlamaForCausalLM

    world = world or World.build()
    spec = spec or ModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)

    t0 = time.monotonic()
    tok = train_tokenizer(world, spec.vocab_size)
    config = _llama_config(spec, tok)
    model = LlamaForCausalLM(config)
    losses = pretrain(model, tok, world.pretraining_pairs(), spec, progress)

    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "world.json").write_text(world.to_json())
    # What it was trained on, as plain records: retraining replays them (rayloop.data.replay) without
    # knowing about the demo.
    (out / REPLAY_FILE).write_bytes(write_pairs_jsonl(world.pretraining_pairs()))
    info = {
        "spec": asdict(spec),
        "world_fingerprint": world.fingerprint(),
        "pretraining_pairs": len(world.pretraining_pairs()),
        "final_loss": sum(losses[-20:]) / min(20, len(losses)),
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    (out / "rayloop_build.json").write_text(json.dumps(info, indent=1))
    return info


def finetune(
    base_dir: str | Path,
    out_dir: str | Path,
    pairs: list[tuple[str, str]],
    steps: int = 150,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> list[float]:
    """Plain single-process fine-tune of a model dir on (question, answer) pairs.

    The reference the distributed retraining is compared with (benchmarks) and a
    quick way to make a candidate of known quality in tests.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayloop.training.export import COPY_FROM_BASE

    torch.manual_seed(seed)
    tok: Any = AutoTokenizer.from_pretrained(str(base_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    spec = ModelSpec(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    losses = pretrain(model, tok, pairs, spec)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    # Fine-tuning leaves the tokenizer as it was: copy its files rather than re-saving them, so the
    # result stays byte-compatible with its base (in-place weight swaps compare tokenizer files).
    for name in (*COPY_FROM_BASE, "world.json", REPLAY_FILE):
        if (Path(base_dir) / name).is_file():
            shutil.copy(Path(base_dir) / name, out / name)
    return losses
