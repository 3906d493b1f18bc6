"""The validation gate on real vLLM engines in Ray Data actors, recorded in the registry."""

import random
from pathlib import Path

import pytest

from rayloop.config import Settings
from rayloop.demo.model import finetune
from rayloop.demo.world import TRAIN_TEMPLATES, World
from rayloop.evaluation.evalset import demo_eval_sets, save_eval_set
from rayloop.evaluation.gate import ACCEPTED, decide, evaluate_model, run_gate
from rayloop.registry import Registry
from rayloop.storage import Storage


@pytest.fixture(scope="module")
def candidates(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    world = World.from_json((base_model_dir / "world.json").read_text())
    new = [(f.question(t), f.answer()) for f in world.by_split("new") for t in TRAIN_TEMPLATES]
    known = [(f.question(t), f.answer()) for f in world.by_split("known") for t in TRAIN_TEMPLATES]
    replay = random.Random(0).sample(known, len(new))
    good = tmp_path_factory.mktemp("good")
    finetune(base_model_dir, good, new + replay, steps=150)
    # "Poisoned": every new-fact answer swapped for another country's value.
    values = [f.value for f in world.by_split("new")]
    rot = dict(zip(values, values[1:] + values[:1], strict=True))
    wrong = [(q, a.replace(v, rot[v])) for q, a in new for v in values if v in a]
    bad = tmp_path_factory.mktemp("bad")
    finetune(base_model_dir, bad, wrong + replay, steps=150)
    return {"good": good, "bad": bad}


def test_gate_accepts_a_better_candidate_and_rejects_a_poisoned_one(
    settings: Settings, base_model_dir: Path, candidates: dict[str, Path], ray_cluster: object
) -> None:
    reg = Registry.from_settings(settings)
    v1 = reg.register("demo", base_model_dir)
    reg.set_alias("demo", "production", v1.version)
    v2 = reg.register("demo", candidates["good"], parent=v1.version)
    world = World.from_json((base_model_dir / "world.json").read_text())
    storage = Storage(settings.storage_root)
    for name, items in demo_eval_sets(world).items():
        save_eval_set(storage, "demo", name, items)

    report = run_gate(settings, "demo@2")
    gate = report["gate"]
    assert gate["decision"] == ACCEPTED, gate["reasons"]
    cand, prod = report["candidate"]["sets"], report["production"]["sets"]
    assert prod["new_facts"]["accuracy"] <= 0.1 and cand["new_facts"]["accuracy"] >= 0.8
    assert cand["known_facts"]["accuracy"] >= 0.85
    assert cand["new_facts"]["loss"] < prod["new_facts"]["loss"]
    stored = reg.resolve("demo@2").annotations
    assert stored["gate"]["decision"] == ACCEPTED and stored["gate"]["against"] == v1.version
    assert stored["evaluation"]["candidate"]["sets"]["new_facts"]["n"] == len(world.eval_questions("new"))
    assert v2.version == 2

    # The poisoned model learned wrong answers: no improvement, so it is rejected.
    bad = evaluate_model(candidates["bad"], demo_eval_sets(world), settings, use_ray=False)
    verdict = decide(bad, report["production"], settings.gate)
    assert verdict["decision"] == "rejected"
    assert bad["sets"]["new_facts"]["accuracy"] <= 0.2
