"""`rayloop report NAME`: the offline HTML page shows what the registry and the interaction store hold."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from rayloop.cli import cli
from rayloop.config import load_settings
from rayloop.data.capture import CaptureWriter
from rayloop.monitoring.report import eval_accuracy, version_stats
from rayloop.registry import Registry
from tests.registry_util import make_model_dir

pytestmark = pytest.mark.unit


class _Page(HTMLParser):
    """Headings, table cells, figures and external references of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.cells: list[str] = []
        self.svgs = 0
        self.external: list[str] = []
        self.scripts = 0
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in = tag
        self.svgs += tag == "svg"
        self.scripts += tag == "script"
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("#"):
                self.external.append(v)

    def handle_data(self, data: str) -> None:
        if self._in in ("h1", "h2"):
            self.headings.append(data.strip())
        elif self._in == "td":
            self.cells.append(data.strip())

    def handle_endtag(self, tag: str) -> None:
        self._in = None


def _rows(n: int, version: int, *, errors: int = 0, ttft: float = 50.0) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {
            "request_id": f"v{version}-{i:04d}",
            "timestamp": now,
            "model_name": "demo",
            "model_version": version,
            "endpoint": "chat",
            "messages": json.dumps([{"role": "user", "content": "q"}]),
            "completion": "a",
            "status": "error" if i < errors else "ok",
            "ttft_ms": ttft,
        }
        for i in range(n)
    ]


@pytest.fixture
def loop(tmp_path: Path) -> dict[str, Any]:
    settings = load_settings(env={"RAYLOOP_HOME": str(tmp_path / "home")})
    reg = Registry.from_settings(settings)
    reg.register("demo", make_model_dir(tmp_path / "m1", seed=1))
    reg.register("demo", make_model_dir(tmp_path / "m2", seed=2), parent=1, lineage={"snapshot_id": "snap-abc"})
    reg.set_alias("demo", "production", 1)
    reg.annotate(
        "demo@2",
        "evaluation",
        {
            "candidate": {
                "model": "demo@2",
                "sets": {"new_facts": {"accuracy": 0.9}, "known_facts": {"accuracy": 1.0}},
            },
            "production": {
                "model": "demo@1",
                "sets": {"new_facts": {"accuracy": 0.2}, "known_facts": {"accuracy": 1.0}},
            },
        },
    )
    reg.annotate("demo@2", "gate", {"decision": "accepted", "reasons": [], "against": 1})
    rid = reg.begin_rollout("demo", from_version=1, to_version=2, strategy="canary", plan={}, owner="test")
    for ev in (
        {"event": "traffic", "canary_percent": 50.0, "shadow_percent": 0.0},
        {"event": "step_passed", "step": 0, "percent": 50, "decision": "pass", "reasons": []},
        {"event": "traffic", "canary_percent": 100.0, "shadow_percent": 0.0},
        {"event": "breach", "slot": "canary", "reasons": ["error rate 0.30 > stable 0.00 + 0.05"]},
        {"event": "rollback", "reason": "error rate"},
    ):
        reg.update_rollout(rid, event=ev)
    reg.end_rollout(rid, "rolled_back")

    async def capture() -> None:
        w = CaptureWriter(settings.storage_root, None, 1000, 600, 10_000, journal_dir=str(tmp_path / "journal"))
        await w.append("interactions", _rows(20, 1) + _rows(10, 2, errors=3, ttft=200.0) + _rows(2, 1))  # 2 again
        fb = [
            {
                "request_id": "v1-0000",
                "timestamp": datetime.now(UTC),
                "rating": 1,
                "model_name": "demo",
                "model_version": 1,
            }
        ]
        fb.append({**fb[0], "request_id": "v2-0005", "rating": -1, "model_version": 2})
        await w.append("feedback", fb)
        await w.flush()

    asyncio.run(capture())
    return {"settings": settings, "reg": reg, "rid": rid, "home": tmp_path / "home"}


def test_version_stats_and_eval_accuracy_come_from_the_store_and_the_gate(loop: dict[str, Any]) -> None:
    stats = version_stats(loop["settings"], "demo")
    assert {v: (s.requests, s.errors, s.mean_rating) for v, s in stats.items()} == {1: (20, 0, 1.0), 2: (10, 3, -1.0)}
    assert stats[2].ttft_quantile(0.5) == 200.0 and stats[1].error_rate == 0.0
    assert eval_accuracy(loop["reg"].list_versions("demo")) == {
        1: {"new_facts": 0.2, "known_facts": 1.0},
        2: {"new_facts": 0.9, "known_facts": 1.0},
    }


def test_report_command_writes_a_self_contained_page(loop: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYLOOP_HOME", str(loop["home"]))
    r = CliRunner().invoke(cli, ["report", "demo", "--json"])
    assert r.exit_code == 0, r.output
    path = Path(json.loads(r.output)["report"])
    assert path == loop["home"] / "reports" / "demo" / "index.html"
    page = _Page()
    page.feed(path.read_text())
    assert page.headings == ["rayloop report: demo", "Rollouts", "Versions in service", "Evaluation", "Lineage"]
    assert page.svgs == 3 and page.scripts == 0 and page.external == []  # offline: nothing to fetch
    cells = page.cells
    assert f"#{loop['rid']}" in cells and "rolled_back" in cells
    assert any(c.startswith("2 judged, last fail: breach: error rate 0.30") for c in cells), cells
    assert "30.0%" in cells and "snap-abc" in cells and "accepted" in cells and "production" in cells
    # A model that does not exist is a clear error, not an empty page.
    bad = CliRunner().invoke(cli, ["report", "nobody"])
    assert bad.exit_code != 0 and "model 'nobody' does not exist" in bad.output
