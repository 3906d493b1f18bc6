"""The web console without a cluster: sessions, what each page shows (from a real registry and a status
document shaped like ``rayloop status --json``), and every template rendered. The pages in a browser on a
live cluster: tests/integration/test_rollout.py."""

from __future__ import annotations

import html.parser
from pathlib import Path
from typing import Any

import pytest

from rayloop.config import Settings
from rayloop.console import session, views
from rayloop.console.app import _layout, _templates, app_config
from rayloop.registry import Registry
from tests.registry_util import make_model_dir

pytestmark = pytest.mark.unit
SECRET = b"k" * 64


def test_a_session_is_valid_until_it_expires_and_only_while_its_key_is_accepted() -> None:
    kh = "ab" * 32
    cookie = session.issue(SECRET, kh, ttl_s=60, now=1000)
    assert session.verify(SECRET, cookie, {kh}, now=1059)
    assert not session.verify(SECRET, cookie, {kh}, now=1061), "expired"
    assert not session.verify(SECRET, cookie, {"cd" * 32}, now=1000), "its key was removed"
    assert not session.verify(b"x" * 64, cookie, {kh}, now=1000), "signed with another secret"
    key_id, expires, sig = cookie.split(".")
    assert not session.verify(SECRET, f"{key_id}.{int(expires) + 9999}.{sig}", {kh}, now=1000), "tampered"
    for bad in (None, "", "garbage", "a.b", "a.b.c.d"):
        assert not session.verify(SECRET, bad, {kh}, now=1000)


def test_after_sign_in_only_pages_of_the_console_itself() -> None:
    assert session.safe_next("/console/models/demo", "/console") == "/console/models/demo"
    for bad in ("https://evil.example/", "//evil.example/x", "/other", "", None, "/console\\..\\x"):
        assert session.safe_next(bad, "/console") == "/console/"


def test_the_secret_is_created_once_in_storage(settings: Settings) -> None:
    from rayloop.storage import Storage

    storage = Storage(settings.storage_root)
    first = session.console_secret(storage)
    assert len(first) == 64 and session.console_secret(storage) == first


def test_weights_follow_the_route_table_of_the_serve_summary() -> None:
    serve = {"model": "demo", "slots": {"stable": 1, "canary": 2, "shadow": None}, "canary_percent": 25.0}
    assert [(w.slot, w.version, w.percent) for w in views.weights(serve)] == [("stable", 1, 75.0), ("canary", 2, 25.0)]
    lean = {"model": "demo", "slots": {"stable": 2, "canary": None, "shadow": None}, "canary_percent": 0.0}
    assert [(w.slot, w.version, w.percent) for w in views.weights(lean)] == [("stable", 2, 100.0)]
    shadow = {**lean, "slots": {"stable": 2, "canary": None, "shadow": 3}, "shadow_percent": 50.0}
    assert [(w.slot, w.percent, w.mirrored) for w in views.weights(shadow)] == [
        ("stable", 100.0, False),
        ("shadow", 50.0, True),
    ]
    assert views.weights(None) == []


@pytest.fixture
def loop(settings: Settings, tmp_path: Path) -> dict[str, Any]:
    """A registry with three versions (v3 trained from a snapshot, gated), a rolled-back canary and a running one."""
    reg = Registry.from_settings(settings)
    reg.register("demo", make_model_dir(tmp_path / "m0", seed=0))
    reg.register("demo", make_model_dir(tmp_path / "m1", seed=1), parent=1)
    reg.register(
        "demo",
        make_model_dir(tmp_path / "m2", seed=2),
        parent=2,
        lineage={"snapshot_id": "snap-0123456789abcdef", "training_config": {"epochs": 3}, "metrics": {"loss": 0.5}},
    )
    reg.set_alias("demo", "production", 2)
    reg.annotate("demo@3", "gate", {"decision": "accepted", "reasons": ["known: 1.00 vs 1.00"], "against": 2})
    rid = reg.begin_rollout("demo", from_version=1, to_version=2, strategy="canary", plan={}, owner="t")
    stable = {"requests": 40, "error_rate": 0.0, "p95_ms": 50.0, "mean_rating": 1.0}
    canary = {"requests": 20, "error_rate": 0.1, "p95_ms": 80.0, "mean_rating": -1.0}
    reg.update_rollout(rid, event={"event": "traffic", "canary_percent": 20.0})
    reg.update_rollout(rid, event={"event": "breach", "step": 0, "percent": 20, "canary": canary, "stable": stable})
    reg.update_rollout(rid, event={"event": "rollback", "reason": "mean rating"})
    reg.end_rollout(rid, "rolled_back")
    running = reg.begin_rollout("demo", from_version=2, to_version=3, strategy="canary", plan={}, owner="t")
    reg.update_rollout(running, event={"event": "traffic", "canary_percent": 25.0})
    reg.update_rollout(
        running, event={"event": "step_passed", "step": 0, "percent": 25, "canary": canary, "stable": stable}
    )
    reg.update_rollout(running, state=reg.rollout(running).state.updated(phase="step", step=1, percent=50.0))
    status_doc = {
        "serve": {"model": "demo", "slots": {"stable": 2, "canary": 3, "shadow": None}, "canary_percent": 50.0},
        "serve_error": None,
        "live_window_s": 60.0,
        "live": {"stable": stable, "canary": canary},
        "capture": {"written": {"interactions": 60, "feedback": 30}, "dropped": {"interactions": 0}, "journal_rows": 0},
        "models": {
            "demo": {
                "aliases": reg.aliases("demo"),
                "deployments": [{"name": "demo", "version": 2, "app": "rayloop", "slot": "stable", "since": ""}],
                # (the keys of rayloop status's rollout summary)
                "active_rollout": {
                    "id": running,
                    "strategy": "canary",
                    "from_version": 2,
                    "to_version": 3,
                    "status": "step",
                    "phase": "step",
                    "step": 1,
                    "percent": 50.0,
                },
                "last_rollout": {"id": rid, "strategy": "canary", "status": "rolled_back"},
            }
        },
    }
    return {"reg": reg, "status": status_doc, "rolled_back": rid, "running": running}


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.ids: set[str] = set()
        self.labels_for: set[str] = set()
        self.inputs: set[str] = set()
        self._in_h = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag in ("h1", "h2"):
            self._in_h = True
            self.headings.append("")
        if tag == "label" and a.get("for"):
            self.labels_for.add(str(a["for"]))
        if tag == "input" and a.get("type") != "hidden":
            self.inputs.add(str(a.get("id")))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2"):
            self._in_h = False

    def handle_data(self, data: str) -> None:
        if self._in_h:
            self.headings[-1] += data


def _render(template: str, **context: Any) -> _Page:
    html_text = _templates().get_template(template).render(prefix="/console", signed_in=True, **context)
    page = _Page()
    page.feed(html_text)
    assert page.headings and page.headings[0].strip(), f"{template} has no h1"
    assert "main" in page.ids, "a main landmark the skip link targets"
    return page


def test_every_page_renders_with_headings_and_the_data_it_names(loop: dict[str, Any]) -> None:
    reg, doc = loop["reg"], loop["status"]
    index = _render("index.html", title="Models", **views.overview(reg, doc))
    assert {"models", "capture"} <= index.ids

    data = views.model_page(reg, "demo", doc, now=2e9)
    assert [(w["slot"], w["version"], w["percent"]) for w in data["live"]["weights"]] == [
        ("stable", 2, 50.0),
        ("canary", 3, 50.0),
    ]
    assert [r.id for r in data["rollouts"]] == [loop["running"], loop["rolled_back"]]
    assert data["rollouts"][1].rollback_reason == "analysis_failed" and data["rollouts"][1].verdicts == {"fail": 1}
    assert data["series"]["p95_ms"]["canary"][0][1] == 80.0, "the judged steps start the charts"
    model = _render("model.html", title="demo", **data)
    assert {"weights", "active-rollout", "versions", "rollouts", "chart-weight", "chart-p95_ms"} <= model.ids

    rollout = views.rollout_page(reg, loop["rolled_back"])
    assert [p[1] for p in rollout["traffic"]] == [0.0, 20.0, 0.0]
    assert [v["verdict"] for v in rollout["verdicts"]] == ["fail"]
    assert {"timeline", "verdicts", "chart-traffic"} <= _render("rollout.html", title="r", **rollout).ids

    lineage = views.lineage(reg, "demo", 3)
    assert {n.id for n in lineage["nodes"]} == {"v1", "v2", "v3", "s3", "t3", "g3"}
    assert ("v2", "v3", "parent of") in lineage["edges"] and ("s3", "t3", "trained on") in lineage["edges"]
    graph = _layout(lineage)
    by_id = {b["node"].id: b for b in graph["boxes"]}
    assert by_id["v1"]["y"] < by_id["v2"]["y"] < by_id["v3"]["y"], "oldest at the top"
    assert by_id["s3"]["x"] < by_id["t3"]["x"] < by_id["v3"]["x"] < by_id["g3"]["x"]
    assert "lineage" in _render("version.html", title="demo@3", graph=graph, **lineage).ids

    login = _render("login.html", title="Sign in", next="/console/", failed=True)
    assert login.inputs <= login.labels_for, "every input has a label"


def test_live_view_for_a_model_not_served_here_has_no_weights(loop: dict[str, Any]) -> None:
    view = views.live(loop["status"], "other", now=1.0)
    assert view["weights"] == [] and view["rollout"] is None


def test_the_console_app_config_never_carries_a_registry_password(settings: Settings) -> None:
    with_pw = settings.model_copy(
        update={"registry": settings.registry.model_copy(update={"url": "postgresql://u:secret@db/rayloop"})}
    )
    cfg = app_config(with_pw, ["ab" * 32])
    assert ":secret@" not in str(cfg["args"]) and cfg["route_prefix"] == "/console"
    assert cfg["import_path"] == "serve_apps.console:build_app"
