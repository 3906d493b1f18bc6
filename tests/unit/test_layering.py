"""Dependencies point down (docs/architecture.md): checked on every import in the package, lazy ones included."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import rayloop

ROOT = Path(rayloop.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Top-level part of rayloop (subpackage or module) -> the parts it imports anywhere in its code."""
    out: dict[str, set[str]] = defaultdict(set)
    for f in ROOT.rglob("*.py"):
        part = f.relative_to(ROOT).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = (
                [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                bits = name.split(".")
                if bits[0] == "rayloop" and len(bits) > 1 and bits[1] != part:
                    out[part].add(bits[1])
    return out


def test_serving_never_imports_rollout_or_anything_above_it() -> None:
    above = {"rollout", "pipeline", "evaluation", "training", "demo", "cli"}
    assert not _imports()["serving"] & above, _imports()["serving"]


def test_the_foundation_imports_nothing_above_it() -> None:
    imports = _imports()
    for part, allowed in {
        "errors": set(),
        "config": {"errors"},
        "storage": {"errors", "config"},
        "modelfiles": {"errors"},
    }.items():
        assert imports[part] <= allowed, (part, imports[part])


def test_rollout_reaches_serve_only_through_serving() -> None:
    """The controller changes what Serve runs only through serving's app layout and control seam."""
    for f in (ROOT / "rollout").rglob("*.py"):
        src = f.read_text()
        assert "deploy_apps" not in src and "/api/serve/applications" not in src, f


def test_jobs_and_library_code_never_import_a_cli_module() -> None:
    """CLI modules parse and print; what they run lives in the library, which jobs call directly."""
    sources = [*(ROOT.parent / "train_jobs").glob("*.py"), *(f for f in ROOT.rglob("*.py") if f.name != "cli.py")]
    for f in sources:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mod = node.module
                assert not (mod == "rayloop.cli" or mod.endswith(".cli")), f"{f} imports {mod}"


def test_the_library_knows_no_demo() -> None:
    """The demo plugs in through settings and files like a user's own data; data and evaluation never import it."""
    imports = _imports()
    for part in ("data", "evaluation", "serving", "rollout", "training", "registry"):
        assert "demo" not in imports[part], (part, imports[part])


def test_monitoring_reads_the_registry_and_the_store_but_never_serving_or_rollout() -> None:
    """Serving hosts the loop metrics' exporter (rayloop.monitoring.loop): monitoring below it, no cycle."""
    assert not _imports()["monitoring"] & {"serving", "rollout", "pipeline", "cli", "demo"}, _imports()["monitoring"]
