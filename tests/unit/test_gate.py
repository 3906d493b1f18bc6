from typing import Any

from rayloop.config import GateSettings
from rayloop.demo.world import World
from rayloop.evaluation.evalset import EvalItem, demo_eval_sets, load_eval_sets, save_eval_set
from rayloop.evaluation.gate import ACCEPTED, REJECTED, decide
from rayloop.storage import Storage


def _report(**acc: float) -> dict[str, Any]:
    return {"sets": {k: {"n": 10, "correct": round(v * 10), "accuracy": v} for k, v in acc.items()}}


def test_better_candidate_is_accepted() -> None:
    d = decide(
        _report(new_facts=0.9, known_facts=1.0, golden=1.0), _report(new_facts=0.0, known_facts=1.0), GateSettings()
    )
    assert d["decision"] == ACCEPTED
    assert {c["check"] for c in d["checks"]} == {"improvement", "regression", "golden"}


def test_too_small_improvement_is_rejected_with_numbers() -> None:
    d = decide(_report(new_facts=0.1, known_facts=1.0), _report(new_facts=0.0, known_facts=1.0), GateSettings())
    assert d["decision"] == REJECTED
    assert "0.00 -> 0.10" in d["reasons"][0] and "+0.20" in d["reasons"][0]


def test_forgetting_is_rejected_even_with_improvement() -> None:
    d = decide(_report(new_facts=1.0, known_facts=0.5), _report(new_facts=0.0, known_facts=1.0), GateSettings())
    assert d["decision"] == REJECTED
    assert any("known_facts regressed 1.00 -> 0.50" in r for r in d["reasons"])


def test_failed_golden_prompt_rejects() -> None:
    cand = _report(new_facts=1.0, known_facts=1.0, golden=0.7)
    d = decide(cand, _report(new_facts=0.0, known_facts=1.0), GateSettings())
    assert d["decision"] == REJECTED and any("golden" in r for r in d["reasons"])
    assert decide(cand, _report(new_facts=0.0), GateSettings(require_golden=False))["decision"] == ACCEPTED


def test_nothing_to_measure_is_rejected() -> None:
    d = decide(_report(other=1.0), _report(other=0.0), GateSettings())
    assert d["decision"] == REJECTED and "none of the improvement sets" in d["reasons"][0]


def test_eval_items_match_modes() -> None:
    assert EvalItem("s", "p", "Bar").is_correct("It is Bar.")
    assert not EvalItem("s", "p", "Bar").is_correct("It is Barn.")
    assert EvalItem("s", "p", "The answer.", "exact").is_correct(" The answer. ")
    assert EvalItem("s", "p", "ans", "contains").is_correct("xansx")


def test_eval_sets_round_trip_through_storage(tmp_path: Any) -> None:
    st = Storage(str(tmp_path))
    sets = demo_eval_sets(World.build())
    for name, items in sets.items():
        save_eval_set(st, "demo", name, items)
    loaded = load_eval_sets(st, "demo")
    assert loaded == sets
    assert len(loaded["golden"]) == 3 and all(i.target for i in loaded["new_facts"])
