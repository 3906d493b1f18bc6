"""Write docs/cli.md from the CLI itself: every command's usage, help text and options.

    .venv/bin/python scripts/gen_cli_docs.py            # rewrite docs/cli.md
    .venv/bin/python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md is out of date

A unit test runs the check, so the reference never drifts from the code.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"

HEADER = """# `rayloop` command reference

Generated from the CLI by `scripts/gen_cli_docs.py` (a unit test keeps it current); `rayloop COMMAND
--help` prints the same. Every command that shows something takes `--json` and then writes only the JSON
document on stdout. Exit codes: 0 done, 1 error, 2 usage, 3 the gate rejected the candidate, 4 a rollout
ended rolled back or aborted. Settings come from `rayloop.yaml`, `RAYLOOP_...` variables and flags (see
the README's Settings section; `rayloop config schema` prints them all).
"""


def _commands(group: click.Group, ctx: click.Context, prefix: str) -> list[tuple[str, click.Command, click.Context]]:
    out = []
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        # Commands registered lazily (imported when they run): document the real ones.
        if hasattr(cmd, "_load"):
            cmd = cmd._load()
        elif hasattr(cmd, "_loader"):
            cmd = cmd._loader()
        sub = click.Context(cmd, info_name=name, parent=ctx)
        out.append((f"{prefix} {name}", cmd, sub))
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, sub, f"{prefix} {name}"))
    return out


def render() -> str:
    from rayloop.cli import cli

    root = click.Context(cli, info_name="rayloop")
    parts = [HEADER]
    for path, cmd, ctx in _commands(cli, root, "rayloop"):
        parts.append(f"\n## `{path}`\n")
        parts.append(f"```\n{cmd.get_usage(ctx).strip()}\n```\n")
        if cmd.help:
            parts.append("\n" + inspect.cleandoc(click.unstyle(cmd.help)) + "\n")
        opts = [p.get_help_record(ctx) for p in cmd.get_params(ctx) if isinstance(p, click.Option)]
        rows = [r for r in opts if r is not None and r[0] not in ("-h, --help", "--help")]
        if rows:
            parts.append("\n| option | meaning |\n| --- | --- |\n")
            for flags, text in rows:
                meaning = " ".join(text.split()).replace("|", "\\|")
                shown = flags.replace("|", "\\|")
                parts.append(f"| `{shown}` | {meaning} |\n")
    return "".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="Exit 1 if docs/cli.md differs from the CLI.")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
