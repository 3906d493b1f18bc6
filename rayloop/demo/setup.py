"""``rayloop init``: build the demo world and base model under RAYLOOP_HOME."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from rayloop.config import Settings
from rayloop.demo.model import ModelSpec, build_base_model
from rayloop.demo.world import World
from rayloop.evaluation.evalset import EvalItem

logger = logging.getLogger(__name__)


def base_model_dir(settings: Settings) -> Path:
    return settings.base_model_path


def init_base_model(
    settings: Settings,
    out: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    force: bool = False,
    show_progress: bool = True,
    use_cache: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Build (or reuse) the base model; returns its build info with ``model_dir``.

    A build of the same recipe made earlier on this machine (:func:`build_cache_dir`) is copied instead of
    pre-training again, unless ``use_cache`` is off; ``force`` rebuilds and replaces nothing in the cache.
    The progress bar goes to ``console`` (a rich Console; default: stdout).
    """
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

    cache = build_cache_dir(world, spec) if use_cache and not force else None
    if cache is not None and (cache / "rayloop_build.json").is_file():
        shutil.copytree(cache, out_dir, dirs_exist_ok=True)
        info = json.loads((out_dir / "rayloop_build.json").read_text())
        info.update(model_dir=str(out_dir), reused=False, cached_build=str(cache))
        return info
    if show_progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("pre-training base model"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("pretrain", total=spec.steps, loss=float("nan"))
            info = build_base_model(
                out_dir, world, spec, progress=lambda s, n, loss: bar.update(task, completed=s, loss=loss)
            )
    else:
        info = build_base_model(out_dir, world, spec)
    if cache is not None:
        try:
            _keep_in_cache(out_dir, cache)
        except OSError as e:  # a cache that cannot be written costs the next init a build, nothing else
            logger.warning("could not keep the demo model build in %s: %s", cache, e)
    info["model_dir"] = str(out_dir)
    info["reused"] = False
    return info


def build_cache_dir(world: World, spec: ModelSpec) -> Path:
    """Where a build of ``world`` and ``spec`` is kept for the next ``rayloop init`` on this machine
    (``$XDG_CACHE_HOME/rayloop/demo-models/KEY``, default ``~/.cache``).

    The build is deterministic, so KEY is a digest of what determines it: the world, the spec, the
    versions of torch, transformers and tokenizers, and the source of the modules that build it.
    """
    import hashlib
    from dataclasses import asdict
    from importlib.metadata import version

    import rayloop.demo.model as model_module
    import rayloop.demo.world as world_module

    recipe = {
        "world": world.fingerprint(),
        "spec": asdict(spec),
        "libraries": {lib: version(lib) for lib in ("torch", "transformers", "tokenizers")},
        "source": [
            hashlib.sha256(Path(m.__file__ or "").read_bytes()).hexdigest() for m in (model_module, world_module)
        ],
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "rayloop" / "demo-models" / key


def _keep_in_cache(src: Path, cache: Path) -> None:
    """Copy the built model ``src`` into ``cache`` whole or not at all (a sibling temp dir, then a rename);
    a cache entry another process finished first is kept."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if not cache.exists():
            os.rename(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
