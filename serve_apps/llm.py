"""Serve application: rayloop's OpenAI-compatible LLM server (one layout for serving and every rollout).

``import_path: serve_apps.llm:build_app`` in a Serve config; ``args`` are
validated into :class:`rayloop.serving.app.ServeArgs`::

    applications:
      - name: rayloop
        import_path: serve_apps.llm:build_app
        args: {model: demo, settings: {serving: {replicas: 2}}}
        deployments:
          - name: llm-stable
            user_config: {model: demo, version: 3, fingerprint: "<sha256>"}

``llm-canary`` and ``llm-shadow`` (idle unless a rollout uses them) and the
route table (``routes`` in ``llm-stable``'s ``user_config``) are written by
`rayloop serve` and `rayloop deploy` (see :mod:`rayloop.serving.app`).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application


def build_app(args: dict[str, Any]) -> Application:
    from rayloop.serving.app import ServeArgs
    from rayloop.serving.app import build_app as build

    app: Application = build(ServeArgs.model_validate(args))
    return app
