"""DeepSpeed checkpoint -> a Hugging Face model directory with safetensors weights.

The ZeRO shards of every rank are gathered into one fp32 state dict with
DeepSpeed's own ``zero_to_fp32`` (works for stages 1-3, ZeRO-3 included, on
one CPU process, from the merged checkpoint Ray Train persisted), loaded into
the parent's architecture and saved as safetensors. Tokenizer, chat template
and generation config are copied from the parent so vLLM loads the result
as it loaded the parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rayloop.errors import TrainingError

COPY_FROM_BASE = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in this block unpickles tensors and plain data only (``weights_only=True``), plus
    the three DeepSpeed classes its ZeRO optimizer states hold. DeepSpeed's own consolidation asks for
    ``weights_only=False``; a checkpoint comes from storage, so arbitrary code in it must not run."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real


def consolidated_state_dict(ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    import torch

    d = Path(ckpt_dir)
    tag_dir = d / tag
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _weights_only_loads():
            sd: dict[str, Any] = get_fp32_state_dict_from_zero_checkpoint(str(d), tag=tag)
        return sd
    # ZeRO stage 0: the module weights are whole in rank 0's model states.
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise TrainingError(f"checkpoint {str(d)!r} holds no DeepSpeed model states under {tag!r}")
    blob = torch.load(states, map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in blob["module"].items()}


def export_hf(ckpt_dir: str | Path, tag: str, base_dir: str | Path, out_dir: str | Path, extra: dict[str, Any]) -> Path:
    """Write ``out_dir`` as an HF model: consolidated fp32 weights + the parent's tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM

    base, out = Path(base_dir), Path(out_dir)
    sd = consolidated_state_dict(ckpt_dir, tag)
    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Tied weights may be absent from the gathered dict; anything else missing is a bug.
    missing = [m for m in missing if not (model.config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise TrainingError(
            f"checkpoint does not match the base model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    # Written beside the target and renamed into place: a crash mid-export never leaves a directory that
    # looks like a finished model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for name in COPY_FROM_BASE:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        (tmp / "rayloop_training.json").write_text(json.dumps(extra, indent=1, sort_keys=True, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
