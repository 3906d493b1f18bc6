import itertools
import json
from typing import Any

from rayloop.config import GateSettings
from rayloop.demo.setup import demo_eval_sets
from rayloop.demo.world import World
from rayloop.evaluation.evalset import EvalItem, load_eval_sets, save_eval_set
from rayloop.evaluation.gate import ACCEPTED, REJECTED, decide
from rayloop.evaluation.inference import LoadReport, VLLMPredictor
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


class _FakeLLM:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def collective_rpc(self, method: str, kwargs: dict[str, Any] | None = None) -> None:
        self.log.append(method + (f"({kwargs['weights_path']})" if kwargs else ""))

    def reset_prefix_cache(self) -> None:
        self.log.append("reset_prefix_cache")


class _NoVLLM(VLLMPredictor):
    """The predictor's swap logic on a fake engine: model ``i`` answers ``m{i}:<prompt>``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.log: list[str] = []
        super().__init__(*args, **kwargs)

    def _build(self, i: int, reason: str) -> None:
        self.log.append(f"build({self.model_dirs[i]})")
        self.llm, self.current = _FakeLLM(self.log), i
        self.loads[i].append(LoadReport("fresh", 0.0, reason))

    def answer(self, prompts: list[str], max_tokens: int | None = None) -> list[str]:
        return [f"m{self.current}:{p}" for p in prompts]

    def target_nll(self, prompts: list[str], targets: list[str]) -> list[float]:
        return [float(self.current or 0)] * len(prompts)


def _golden(i: int) -> dict[str, Any]:
    return {"prompts": ["g"], "outputs": [f"m{i}:g"], "max_tokens": 4}


def _same_shapes(monkeypatch: Any, shapes: dict[str, str] | None = None) -> None:
    from rayloop.serving import checkpoint

    def check(d: str, **_: Any) -> checkpoint.Signature:
        return checkpoint.Signature((shapes or {}).get(str(d), "{}"), "t", "tok", 1)

    monkeypatch.setattr(checkpoint, "check_model_dir", check)


def test_evaluation_engine_swaps_a_checked_version_in_place(monkeypatch: Any) -> None:
    _same_shapes(monkeypatch)
    p = _NoVLLM(["a", "b"], {}, golden=[None, _golden(1)])
    out = p({"prompt": ["q1", "q2"], "target": ["x", ""]})
    assert out["output_0"] == ["m0:q1", "m0:q2"] and out["output_1"] == ["m1:q1", "m1:q2"]
    assert out["nll_1"][0] == 1.0 and out["nll_1"][1] != out["nll_1"][1]  # no target: NaN
    assert p.log == ["build(a)", "reload_weights(b)", "rayloop_redispatch_cpu_gemm", "reset_prefix_cache"]
    assert [r["mode"] for r in json.loads(out["load_1"][0])] == ["in_place"]
    # The next batch starts with the loaded version; going back to `a` needs a fresh engine (no golden for it).
    out = p({"prompt": ["q3"]})
    assert out["output_0"] == ["m0:q3"] and out["output_1"] == ["m1:q3"]
    assert p.log[-1] == "build(a)" and p.current == 0
    assert "no golden answers" in p.loads[0][-1].reason


def test_evaluation_engine_rebuilds_when_a_swap_cannot_be_trusted(monkeypatch: Any) -> None:
    _same_shapes(monkeypatch, {"big": '{"hidden_size": 256}'})
    wrong = {"prompts": ["g"], "outputs": ["something else"], "max_tokens": 4}
    p = _NoVLLM(["a", "b", "big"], {}, golden=[None, wrong, _golden(2)])
    p.use(1)
    assert p.loads[1][-1].mode == "fresh" and "golden prompts [0] differ" in p.loads[1][-1].reason
    assert p.answer(["q"]) == ["m1:q"]
    p.use(2)
    assert p.loads[2][-1].mode == "fresh" and "architecture/shape config differs" in p.loads[2][-1].reason
    tp = _NoVLLM(["a", "b"], {"tensor_parallel_size": 2}, golden=[None, _golden(1)])
    tp.use(1)
    assert tp.loads[1][-1].reason == "tensor-parallel engine"


def test_report_sums_the_rows_shares_of_inference_time(monkeypatch: Any) -> None:
    from pathlib import Path

    import rayloop.evaluation.inference as inference
    from rayloop.evaluation.gate import _report

    _same_shapes(monkeypatch)
    p = _NoVLLM(["a"], {})
    clock = itertools.count(10.0)  # every reading 1 s later: the batch took 1 s
    monkeypatch.setattr(inference.time, "perf_counter", lambda: next(clock))
    item = {"set": "new_facts", "reference": "x", "match": "exact", "target": ""}
    out = p({"prompt": ["q1", "q2", "q3", "q4"], **{k: [v] * 4 for k, v in item.items()}})
    assert out["seconds_0"] == [0.25] * 4
    rep = _report([{k: out[k][n] for k in out} for n in range(4)], 0, Path("a"), "demo@1")
    assert rep["seconds"] == 1.0 and rep["items_per_s"] == 4.0
    assert rep["sets"]["new_facts"]["n"] == 4 and rep["engine"][0]["mode"] == "fresh"


def test_a_candidate_judged_only_on_feedback_data_is_rejected() -> None:
    """eval_split comes from user feedback: users could steer it. Some operator set must pass a check."""
    policy = GateSettings(improve_on=["eval_split"], protect=[])
    d = decide(_report(eval_split=1.0), _report(eval_split=0.0), policy)
    assert d["decision"] == REJECTED and any("users cannot write" in r for r in d["reasons"]), d["reasons"]
    # The same gain with a regression set (written by the operator) that holds: accepted.
    protected = GateSettings(improve_on=["eval_split"], protect=["regression"])
    ok = decide(_report(eval_split=1.0, regression=1.0), _report(eval_split=0.0, regression=1.0), protected)
    assert ok["decision"] == ACCEPTED, ok["reasons"]
    # Golden prompts count as an operator set too.
    golden = decide(_report(eval_split=1.0, golden=1.0), _report(eval_split=0.0), policy)
    assert golden["decision"] == ACCEPTED, golden["reasons"]


def test_eval_sets_from_files_are_named_after_them(tmp_path: Any) -> None:
    import pytest

    from rayloop.errors import EvaluationError
    from rayloop.evaluation.evalset import load_eval_set_files

    f = tmp_path / "regression.jsonl"
    f.write_text(
        '{"prompt": "Who rules Voubos?", "reference": "Queen"}\n\n{"prompt": "x", "reference": "y", "match": "exact"}\n'
    )
    sets = load_eval_set_files([str(f)])
    assert list(sets) == ["regression"] and [i.set for i in sets["regression"]] == ["regression"] * 2
    assert sets["regression"][1].match == "exact"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "reference": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(EvaluationError, match="line 2"):
        load_eval_set_files([str(bad)])
    with pytest.raises(EvaluationError, match="does not exist"):
        load_eval_set_files([str(tmp_path / "missing.jsonl")])
