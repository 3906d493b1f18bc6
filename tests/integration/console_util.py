"""The web console in headless Chromium (Debian's ``chromium``, driven by Playwright; scripts/test.sh installs
both), checked against ``rayloop status``: what a signed-in operator sees during a live canary."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def artifacts_dir() -> Path:
    """Where screenshots go (``RAYLOOP_TEST_ARTIFACTS``, default ``test-artifacts/`` in the checkout)."""
    out = Path(os.environ.get("RAYLOOP_TEST_ARTIFACTS") or REPO / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed: run scripts/test.sh (it installs Debian's package)"
    return path


def check_console_during_canary(
    url: str, key: str, model: str, live_status: Callable[[], dict[str, Any]], shots: Path
) -> dict[str, Any]:
    """Sign in, then load every page while ``model``'s canary runs; returns what was seen. ``live_status``
    is ``rayloop status`` for the model (what the pages must agree with)."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, Any] = {}
    api = f"{url}api/models/{model}/live"
    # The JSON API is behind the keys too: no key, no data; a Bearer key works without a session.
    assert httpx.get(api, timeout=30).status_code == 401
    assert httpx.get(api, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--headless=new"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            # Not signed in: every page leads to the sign-in form, which comes back to that page.
            page.goto(f"{url}models/{model}")
            assert page.locator("h1").inner_text() == "Sign in", page.url
            page.fill("#key", "not-a-key")
            page.keyboard.press("Enter")
            page.wait_for_selector("text=That key is not accepted.")
            page.fill("#key", key)  # the field has a label and takes Enter: no mouse needed
            page.keyboard.press("Enter")
            page.wait_for_url(f"{url}models/{model}")
            assert page.locator("h1").inner_text() == model

            # Keyboard: the first Tab reaches the skip link, and Enter on it moves focus to the content.
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.textContent") == "Skip to content"
            page.keyboard.press("Enter")
            page.wait_for_function("document.activeElement && document.activeElement.id === 'main'")

            # Traffic now: the table and the weight chart show what Serve applies.
            status = live_status()
            serve = status["serve"]
            canary_percent = float(serve["canary_percent"])
            want = {
                ("stable", serve["slots"]["stable"], 100.0 - canary_percent),
                ("canary", serve["slots"]["canary"], canary_percent),
            }
            rows = page.locator("#weights tbody tr")
            shown = {
                (
                    r.get_attribute("data-slot"),
                    int(r.get_attribute("data-version") or 0),
                    float(r.get_attribute("data-weight") or -1),
                )
                for r in rows.all()
            }
            assert shown == want, (shown, want)
            seen["weights"] = sorted(shown)
            labels = sorted(f"v{v} {s}" for s, v, _ in want)
            # The charts fill as the page polls the live API: wait for a few points and both versions.
            page.wait_for_function(
                """labels => {
                    const c = window.rayloopCharts || {};
                    const w = c["chart-weight"], p = c["chart-p95_ms"];
                    return w && w.data[0].length >= 3 && JSON.stringify(w.labels) === JSON.stringify(labels)
                        && p && labels.every(l => p.labels.includes(l));
                }""",
                arg=labels,
                timeout=60_000,
            )
            chart = page.evaluate(
                """() => { const c = window.rayloopCharts["chart-weight"];
                    return {labels: c.labels, last: c.data.slice(1).map(s => s[s.length - 1])}; }"""
            )
            assert dict(zip(chart["labels"], chart["last"], strict=True)) == {f"v{v} {s}": w for s, v, w in want}, chart
            for metric in ("p95_ms", "error_rate", "mean_rating"):
                assert page.locator(f"#chart-{metric} canvas").count() == 1, metric
            active = status["models"][model]["active_rollout"]
            assert page.get_attribute("#active-rollout", "data-rollout") == str(active["id"])
            page.screenshot(path=str(shots / "console-model.png"), full_page=True)

            # The overview: the model, its aliases as the registry has them, capture health.
            page.click("a.brand")
            page.wait_for_selector("#models")
            aliases = {
                a.get_attribute("data-alias"): int(a.get_attribute("data-version") or 0)
                for a in page.locator(f'#models tr[data-model="{model}"] .alias').all()
            }
            assert aliases == status["models"][model]["aliases"], aliases
            assert page.locator("#capture tr[data-outcome=written]").count() == 1
            page.screenshot(path=str(shots / "console-models.png"), full_page=True)

            # The running rollout's page, and the lineage of its new version.
            page.goto(f"{url}rollouts/{active['id']}")
            assert page.get_attribute("#rollout-facts", "data-status") == active["status"]
            assert page.locator("#chart-traffic canvas").count() == 1
            assert page.locator('#timeline tr[data-event="traffic"]').count() >= 1
            page.screenshot(path=str(shots / "console-rollout.png"), full_page=True)
            page.goto(f"{url}models/{model}/versions/{active['to_version']}")
            nodes = {n.get_attribute("data-node") for n in page.locator("#lineage g.node").all()}
            assert {f"v{active['to_version']}", f"v{active['from_version']}"} <= nodes, nodes
            page.screenshot(path=str(shots / "console-lineage.png"), full_page=True)
            seen["at"] = time.time()
        finally:
            browser.close()
    return seen


def screenshot_prometheus_graphs(prom_url: str, exprs: list[str], path: Path, range_s: int) -> None:
    """Prometheus' own graph page with ``exprs`` (the dashboard's queries, without Grafana), as a PNG."""
    import urllib.parse

    from playwright.sync_api import sync_playwright

    params: dict[str, str] = {}
    for i, expr in enumerate(exprs):
        params.update({f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": f"{max(range_s, 60)}s"})
    url = f"{prom_url}/graph?{urllib.parse.urlencode(params)}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--headless=new"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900 * len(exprs) // 2 + 400})
            page.goto(url)
            page.locator(".rickshaw_graph svg path").first.wait_for(state="attached", timeout=60_000)  # drawn
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()
