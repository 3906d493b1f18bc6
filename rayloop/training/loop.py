"""The per-worker training loop: DeepSpeed inside Ray Train.

Runs on every worker of a ``TorchTrainer``. Ray Train has already created
the process group (gloo on CPU, NCCL on GPU); ``deepspeed.initialize`` joins
it. Data arrives through ``ray.train.get_dataset_shard`` (packed blocks from
the snapshot). Every ``checkpoint_every`` optimizer steps all ranks write a
DeepSpeed checkpoint (each rank its own ZeRO shards) next to the resolved
config and the loss history, and report it; Ray Train merges the ranks'
files into one checkpoint directory in storage. After a worker failure the
new worker group resumes from the latest checkpoint: same step, same
position in the epoch, the loss curve continues. "Latest" means the latest
one Ray Train's controller has registered: a report waits in a one-slot queue
until the controller polls the worker (every 2 s), so the newest checkpoint
whose files are already in storage may be lost with the worker.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rayloop.errors import TrainingError

CKPT_TAG = "ds"
STATE_FILE = "train_state.json"
CONFIG_FILE = "training_config.json"


def _batches(shard: Any, cfg: dict[str, Any], epoch: int, cache: list[dict[str, Any]] | None) -> Any:
    """Micro batches of one epoch, the same count on every rank."""
    import torch

    mb = cfg["micro_batch_size"]
    if cache is not None:
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
        order = torch.randperm(len(cache[0]["input_ids"]), generator=g)
        for i in range(0, len(order) - mb + 1, mb):
            idx = order[i : i + mb]
            yield {k: v[idx] for k, v in cache[0].items()}
        return
    yield from shard.iter_torch_batches(
        batch_size=mb, drop_last=True, local_shuffle_buffer_size=4 * mb, local_shuffle_seed=cfg["seed"] + epoch
    )


def _load_shard(shard: Any) -> list[dict[str, Any]]:
    """Read this rank's shard once (small snapshots: avoids a Ray Data pass per epoch)."""
    import torch

    parts: dict[str, list[Any]] = {}
    for b in shard.iter_torch_batches(batch_size=4096):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    return [{k: torch.cat(v) for k, v in parts.items()}]


def _evaluate(engine: Any, shard: Any, cfg: dict[str, Any]) -> float | None:
    """Token-weighted mean loss over this rank's eval shard, all-reduced over ranks."""
    import torch
    import torch.distributed as dist

    engine.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        if shard is not None:
            for b in shard.iter_torch_batches(batch_size=cfg["micro_batch_size"]):
                out = engine(**_inputs(b, engine.device))
                n = int((b["labels"][:, 1:] != -100).sum())
                tot += torch.tensor([float(out.loss) * n, n], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tot)
    engine.train()
    return float(tot[0] / tot[1]) if tot[1] > 0 else None


def _inputs(b: dict[str, Any], device: Any) -> dict[str, Any]:
    import torch

    return {
        k: b[k].to(device=device, dtype=torch.long) for k in ("input_ids", "labels", "attention_mask", "position_ids")
    }


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    ``deepspeed.comm`` builds ``deepspeed_shm_comm`` (a C++ extension, 1-2 minutes
    of both cores on a fresh machine) when it starts, but only DeepSpeed inference
    uses it; ZeRO training all-reduces through torch.distributed (gloo). Marking
    the op incompatible makes DeepSpeed skip it.
    """
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry point; ``cfg`` is the resolved config built by :mod:`rayloop.training.retrain`."""
    entered = time.monotonic()
    if not cfg["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not cfg["use_gpu"]:
        skip_shm_comm_build()
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg["seed"])
    base_dir = cfg["base_dir"]
    if cfg.get("settings") is not None:  # this worker's node may not have the driver's directory
        from rayloop.registry.registry import model_dir_on_this_node

        base_dir = str(model_dir_on_this_node(base_dir, cfg.get("base_ref"), cfg["settings"]))
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg["ds_config"])

    step = 0
    history: list[dict[str, Any]] = []
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            loaded, _ = engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=True)
            if loaded is None:
                # DeepSpeed only warns and returns None when it cannot load: training on would start from the
                # base weights while the step counter says otherwise. Stop instead.
                raise TrainingError(
                    f"cannot load the checkpoint to resume from ({restored.path}, tag {CKPT_TAG!r})",
                    hint="Check the run's storage; delete the run's checkpoints to start it over.",
                )
            state = json.loads((Path(d) / STATE_FILE).read_text())
        step, history, base_eval = state["step"], state["history"], state.get("base_eval_loss")
        history.append({"step": step, "event": "resumed", "attempt": state.get("attempt", 0) + 1})
    print(
        f"rayloop: rank {rank} starts at step {step}"
        + (f" from checkpoint {restored.path}" if restored is not None else " (no checkpoint to resume from)"),
        file=sys.stderr,
        flush=True,
    )

    shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if cfg["has_eval"] else None
    cache = _load_shard(shard) if cfg["cache_shard"] else None
    if restored is None:
        base_eval = None
    if restored is None and eval_shard is not None:
        base_eval = _evaluate(engine, eval_shard, cfg)

    checkpoint_s = 0.0

    def save(metrics: dict[str, Any]) -> None:
        nonlocal checkpoint_s
        t_save = time.monotonic()
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=CKPT_TAG)
            if rank == 0:
                attempt = sum(1 for h in history if h.get("event") == "resumed")
                state = {"step": step, "history": history, "attempt": attempt, "base_eval_loss": base_eval}
                (Path(d) / STATE_FILE).write_text(json.dumps(state))
                (Path(d) / CONFIG_FILE).write_text(json.dumps(cfg["resolved"], indent=1, sort_keys=True))
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"step-{step:06d}"
            )
        checkpoint_s += time.monotonic() - t_save

    spe, accum, total = cfg["steps_per_epoch"], cfg["gradient_accumulation_steps"], cfg["total_steps"]
    t0 = time.monotonic()
    setup_s = t0 - entered  # imports, model load, DeepSpeed init, restore, the base eval loss
    tokens = 0
    window: list[float] = []
    engine.train()
    for epoch in range(step // spe, cfg["epochs"]):
        skip = (step - epoch * spe) * accum  # micro batches already trained in this epoch
        done = 0
        for i, b in enumerate(_batches(shard, cfg, epoch, cache)):
            if done >= spe * accum:
                break
            done += 1
            if i < skip:
                continue
            out = engine(**_inputs(b, engine.device))
            engine.backward(out.loss)
            engine.step()
            tokens += int(b["attention_mask"].sum())
            window.append(float(out.loss.detach()))
            if done % accum == 0:
                step += 1
                loss = sum(window) / len(window)
                window.clear()
                history.append({"step": step, "loss": round(loss, 5), "epoch": epoch})
                if step % cfg["checkpoint_every"] == 0 and step < total:
                    save({"step": step, "loss": loss, "epoch": epoch})
                if step >= total:
                    break
        if step >= total:
            break

    eval_loss = _evaluate(engine, eval_shard, cfg) if eval_shard is not None else None
    elapsed = time.monotonic() - t0
    train_losses = [h["loss"] for h in history if "loss" in h]
    final = {
        "step": step,
        "loss": sum(train_losses[-5:]) / max(1, len(train_losses[-5:])),
        "eval_loss": eval_loss,
        "base_eval_loss": base_eval,
        "train_seconds": elapsed,
        "tokens_per_s": tokens * ctx.get_world_size() / elapsed if elapsed > 0 else 0.0,
        # Where this attempt's time went (train_seconds includes the periodic checkpoints).
        "setup_seconds": round(setup_s, 2),
        "checkpoint_seconds": round(checkpoint_s, 2),
        "done": True,
    }
    save(final)
