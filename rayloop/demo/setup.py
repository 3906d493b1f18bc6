"""``rayloop init``: build the demo world and base model under RAYLOOP_HOME."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from rayloop.config import Settings
from rayloop.demo.model import ModelSpec, build_base_model
from rayloop.demo.world import World
from rayloop.evaluation.evalset import EvalItem


def base_model_dir(settings: Settings) -> Path:
    return settings.base_model_path


def init_base_model(
    settings: Settings,
    out: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    force: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the base model; returns its build info with ``model_dir``."""
    out_dir = Path(out) if out else base_model_dir(settings)
    info_file = out_dir / "rayloop_build.json"
    spec = ModelSpec(seed=seed)
    if steps is not None:
        spec.steps = steps
    world = World.build(seed=seed)
    if info_file.is_file() and not force:
        info = json.loads(info_file.read_text())
        if info.get("world_fingerprint") == world.fingerprint() and info.get("spec") == spec.__dict__:
            info["model_dir"] = str(out_dir)
            info["reused"] = True
            return info

    if show_progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("pre-training base model"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
        ) as bar:
            task = bar.add_task("pretrain", total=spec.steps, loss=float("nan"))
            info = build_base_model(
                out_dir, world, spec, progress=lambda s, n, loss: bar.update(task, completed=s, loss=loss)
            )
    else:
        info = build_base_model(out_dir, world, spec)
    info["model_dir"] = str(out_dir)
    info["reused"] = False
    return info


def save_demo_eval_sets(settings: Settings, model_dir: str | Path, model: str = "demo") -> list[str]:
    """Store the demo world's fixed evaluation sets for ``model`` (what `rayloop eval` and the gate read):
    held-out phrasings of new and known facts, and golden prompts. Returns the set names."""
    from rayloop.evaluation.evalset import save_eval_set
    from rayloop.storage import Storage

    world = World.from_json((Path(model_dir) / "world.json").read_text())
    storage = Storage(settings.storage_root, s3_endpoint=settings.storage.s3_endpoint)
    sets = demo_eval_sets(world)
    for name, items in sets.items():
        save_eval_set(storage, model, name, items)
    return sorted(sets)


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
