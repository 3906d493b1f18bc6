import hashlib
from pathlib import Path

from rayloop.demo.model import EOS, ModelSpec, build_base_model, encode_pair, train_tokenizer
from rayloop.demo.world import World


def _digest(d: Path) -> str:
    return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path: Path) -> None:
    spec = ModelSpec(steps=3, batch_size=4)
    build_base_model(tmp_path / "a", spec=spec)
    build_base_model(tmp_path / "b", spec=ModelSpec(steps=3, batch_size=4))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_chat_template_and_label_mask() -> None:
    tok = train_tokenizer(World.build(), 640)
    ids, labels = encode_pair(tok, "What is the capital of Foo?", "The capital of Foo is Bar.")
    text = tok.decode(ids)
    assert text.startswith("<|bos|><|user|>What is the capital of Foo?<|end|><|assistant|>")
    assert text.endswith(f"The capital of Foo is Bar.{EOS}")
    answer = [t for t in labels if t != -100]
    assert tok.decode(answer) == f"The capital of Foo is Bar.{EOS}"
    assert len(ids) == len(labels)
