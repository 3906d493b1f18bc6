"""The in-place swap's rules, defined once for the serving replica and the gate (rayloop.serving.swap)."""

from __future__ import annotations

import pytest

from rayloop.serving.checkpoint import Signature
from rayloop.serving.swap import NO_GOLDEN, golden_mismatch, swap_blocker, swap_rpcs

pytestmark = pytest.mark.unit


def test_a_swap_needs_the_same_shapes_and_golden_answers_to_check_it() -> None:
    a = Signature('{"hidden_size": 8}', "tensors", "tok", 1)
    assert swap_blocker(None, a, golden_known=True) == "first load"
    assert swap_blocker(a, a, golden_known=False) == NO_GOLDEN
    assert swap_blocker(a, a, golden_known=True) is None
    bigger = Signature('{"hidden_size": 16}', "tensors", "tok", 1)
    assert "architecture/shape config differs" in (swap_blocker(a, bigger, golden_known=True) or "")


def test_swap_procedure_and_its_check() -> None:
    assert [m for m, _ in swap_rpcs("/m")] == ["reload_weights", "rayloop_redispatch_cpu_gemm"]
    assert swap_rpcs("/m")[0][1] == {"weights_path": "/m", "is_checkpoint_format": True}
    assert golden_mismatch(["a", "b"], ["a", "b"]) == []
    assert golden_mismatch(["a", "x"], ["a", "b"]) == [1]
    assert golden_mismatch(["a"], ["a", "b"]) == [0, 1]  # a missing answer is a mismatch, not a pass
