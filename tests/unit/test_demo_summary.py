"""What `rayloop demo` prints at the end: where to go next."""

from __future__ import annotations

import io
from pathlib import Path

from rayloop.demo.run import _Out, _print_summary


def test_the_demo_summary_says_how_to_try_the_endpoint_and_open_the_console(tmp_path: Path) -> None:
    out = io.StringIO()
    summary = {
        "baseline": {"version": 1, "new_accuracy": 0.1, "known_accuracy": 0.9},
        "candidate": {"version": 2, "new_accuracy": 0.8, "known_accuracy": 0.9},
        "gate": {"decision": "pass", "reasons": ["better on new facts"]},
        "rollout": {
            "strategy": "canary",
            "steps": [50, 100],
            "status": "succeeded",
            "requests": 40,
            "failed_requests": 0,
        },
        "production_version": 2,
        "duration_s": 300.0,
        "report": str(tmp_path / "report.html"),
        "try_question": "Where is Norland?",
        "endpoint": "http://127.0.0.1:8000",
        "dashboard": "http://127.0.0.1:8265",
    }
    _print_summary(_Out(quiet=False, file=out), summary, tmp_path / "demo-summary.json")
    text = " ".join(out.getvalue().split())
    assert "production is now demo@2" in text and "curl -s http://127.0.0.1:8000/v1/chat/completions" in text
    assert "rayloop models lineage demo@2" in text
    assert "web console (versions, lineage, rollouts with live traffic): rayloop console" in text
