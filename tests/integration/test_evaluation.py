"""The gate's evaluation engine: several versions answered by one vLLM engine, swapped in place and checked.

A swap whose golden check fails, or that cannot be tried, rebuilds the engine: tests/unit/test_gate.py on a fake
engine; on real vLLM the pipeline job test (tests/integration/test_train_jobs.py) evaluates a production version
that has no golden answers, so its engine is rebuilt in the same actor.
"""

from __future__ import annotations

import json
from pathlib import Path

from rayloop.config import EngineSettings
from rayloop.demo.world import World
from rayloop.evaluation.inference import GoldenAnswers, VLLMPredictor
from rayloop.serving import golden
from tests.integration.serving_util import make_variant


def _golden_of(p: VLLMPredictor) -> dict[str, object]:
    """What a serving replica records for the version a fresh engine holds."""
    return {
        "prompts": list(golden.PROMPTS),
        "outputs": p.answer(list(golden.PROMPTS), golden.MAX_TOKENS),
        "max_tokens": golden.MAX_TOKENS,
    }


def test_versions_swap_into_one_engine_and_answer_as_fresh_engines(base_model_dir: Path, tmp_path: Path) -> None:
    v1, v2 = base_model_dir, make_variant(base_model_dir, tmp_path / "v2", seed=3, scale=0.3)
    engine = EngineSettings().model_dump()
    world = World.from_json((base_model_dir / "world.json").read_text())
    prompts = [q.prompt for q in world.eval_questions("known")[:6] + world.eval_questions("new")[:6]]

    # The reference: a fresh engine of v2.
    ref = VLLMPredictor(str(v2), engine, max_tokens=16)
    try:
        want_v2, golden_v2 = ref.answer(prompts), _golden_of(ref)
    finally:
        ref.close()

    p = VLLMPredictor([str(v1), str(v2)], engine, max_tokens=16, golden=[None, golden_v2])
    try:
        want_v1, golden_v1 = p.answer(prompts), _golden_of(p)
        assert want_v1 != want_v2, "the variant must answer differently, or a stale swap would go unnoticed"

        out = p({"prompt": list(prompts)})
        assert out["output_0"] == want_v1
        assert out["output_1"] == want_v2  # swapped in place, answers exactly as a fresh engine of v2
        assert [r["mode"] for r in json.loads(out["load_0"][0])] == ["fresh"]
        assert [r["mode"] for r in json.loads(out["load_1"][0])] == ["in_place"]
        assert p.current == 1

        # Back to v1 in place (its fresh answers are known now).
        p.golden[0] = GoldenAnswers(**golden_v1)  # type: ignore[arg-type]
        p.use(0)
        assert p.loads[0][-1].mode == "in_place" and p.answer(prompts) == want_v1

    finally:
        p.close()
