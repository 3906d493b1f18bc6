"""Shared argument handling of the ``ray job submit`` entrypoints.

Each job parses its command line into a pydantic model (``extra="forbid"``),
loads settings the same way the CLI does (``--config``, ``RAYLOOP_*``, plus
``--set section.key=value`` overrides), then hands off to ``rayloop``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import yaml

from rayloop.config import Settings, load_settings
from rayloop.errors import ConfigError, RayloopError


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``["training.epochs=3", "data.unrated=keep"]`` -> nested override dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, raw = p.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {p!r} is not KEY=VALUE", hint="Example: --set training.epochs=3")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def common_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", help="Settings file (default: ./rayloop.yaml or $RAYLOOP_CONFIG).")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override one setting.")
    ap.add_argument("--json", action="store_true", help="Print the result as one JSON line.")
    return ap


def described(model: type[Any], field: str) -> str:
    """A job flag's help: the description of its field in the job's argument model (one text for both)."""
    description: str = model.model_fields[field].description or ""
    return description


def settings_from(ns: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    """Settings as the CLI loads them, then ``--set`` overrides, then the job's own flags (``extra``)."""
    overrides = parse_sets(ns.set)
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    return load_settings(ns.config, overrides=overrides)


def job_main(body: Callable[[], tuple[dict[str, Any], int]], *, as_json: bool) -> int:
    """Run a job that reports one document and chooses its exit code; a rayloop error is its message and
    hint on stderr and exit code 1. The document is indented JSON, or one ``RAYLOOP_RESULT`` line."""
    try:
        doc, code = body()
    except RayloopError as e:
        print(f"{type(e).__name__}: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    if as_json:
        print("RAYLOOP_RESULT " + json.dumps(doc, sort_keys=True, default=str))
    else:
        print(json.dumps(doc, indent=1, default=str))
    return code


def run(main: Callable[[list[str]], dict[str, Any]], argv: list[str] | None = None) -> None:
    """Run a job main; rayloop errors become one line on stderr and exit code 1."""
    try:
        result = main(sys.argv[1:] if argv is None else argv)
    except RayloopError as e:
        print(f"{type(e).__name__}: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        sys.exit(1)
    print("RAYLOOP_RESULT " + json.dumps(result, sort_keys=True, default=str))
