"""The demo base model loads in vLLM CPU and scores as documented (greedy)."""

import json
from pathlib import Path

from rayloop.demo.world import World
from rayloop.evaluation.inference import greedy_chat


def test_base_model_knows_known_facts_not_new_ones(base_model_dir: Path) -> None:
    files = {p.name for p in base_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "world.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    cfg = json.loads((base_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32  # vLLM CPU attention rejects head_dim 16

    world = World.from_json((base_model_dir / "world.json").read_text())
    known, new = world.eval_questions("known"), world.eval_questions("new")
    outs = greedy_chat(base_model_dir, [q.prompt for q in known + new])
    known_acc = sum(World.is_correct(q, o) for q, o in zip(known, outs[: len(known)], strict=True)) / len(known)
    new_acc = sum(World.is_correct(q, o) for q, o in zip(new, outs[len(known) :], strict=True)) / len(new)
    assert known_acc >= 0.9, f"base model forgot its pre-training: known-fact accuracy {known_acc:.2f}"
    assert new_acc <= 0.1, f"base model cannot know unseen facts: new-fact accuracy {new_acc:.2f}"
    # It answers in the trained format, i.e. it really generates text, not nothing.
    assert all(o.strip() for o in outs)
