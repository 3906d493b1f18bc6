"""docs/cli.md is generated from the CLI: it must say what `rayloop --help` says today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_command_reference_is_current() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr + "\nRegenerate it: .venv/bin/python scripts/gen_cli_docs.py"
    text = (ROOT / "docs" / "cli.md").read_text()
    for command in ("rayloop deploy", "rayloop data forget", "rayloop env", "rayloop models register"):
        assert f"## `{command}`" in text, command
