"""Serve application: the rayloop router (weighted, sticky and shadow slots) over LLM engines.

``import_path: serve_apps.router:build_app`` in a Serve config; ``args`` are
validated into :class:`rayloop.serving.app.ServeArgs` (the same as
``serve_apps.llm``). The rollout controller (``rayloop deploy``) writes the
deployments' ``user_config``::

    applications:
      - name: rayloop
        import_path: serve_apps.router:build_app
        args: {model: demo}
        deployments:
          - name: llm-stable
            user_config: {model: demo, version: 3, fingerprint: "<sha256>"}
          - name: Router
            user_config: {canary_percent: 0}
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application


def build_app(args: dict[str, Any]) -> Application:
    from rayloop.rollout.app import build_router_app
    from rayloop.serving.app import ServeArgs

    app: Application = build_router_app(ServeArgs.model_validate(args))
    return app
