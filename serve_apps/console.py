"""Serve application: rayloop's read-only web console (``rayloop console`` deploys it).

``import_path: serve_apps.console:build_app``; ``args`` are validated into
:class:`rayloop.console.app.ConsoleArgs` (the settings, and accepted key hashes besides the configured keys).
"""

from __future__ import annotations

from typing import Any


def build_app(args: dict[str, Any]) -> Any:
    from rayloop.console.app import build_app as build

    return build(args)
