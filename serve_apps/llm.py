"""Serve application: rayloop's OpenAI-compatible LLM server.

``import_path: serve_apps.llm:build_app`` in a Serve config; ``args`` are
validated into :class:`rayloop.serving.app.ServeArgs`::

    applications:
      - name: rayloop
        import_path: serve_apps.llm:build_app
        args: {model: demo, settings: {serving: {replicas: 2}}}
        deployments:
          - name: llm-stable
            user_config: {model: demo, version: 3, fingerprint: "<sha256>"}
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application


def build_app(args: dict[str, Any]) -> Application:
    from rayloop.serving.app import ServeArgs, build_openai_app

    app: Application = build_openai_app(ServeArgs.model_validate(args))
    return app
