"""A staging environment: a version served on its own route for testers, never touching production.

``rayloop deploy NAME@REF --env staging`` serves the version in its own Serve app
(``<serving.app_name>-staging``, lean layout, ``serving.staging_replicas`` replicas) under
``serving.staging_route_prefix`` (default ``/staging``: the OpenAI API at ``/staging/v1``), upgrading
it in place when it already runs, and moves the ``staging`` alias. Production's app, traffic and
aliases are not touched. Staging traffic is not captured (testers' requests are not training data).

Promoting what staging serves is one command: ``rayloop deploy NAME@staging --strategy canary`` (the
gate's acceptance, or ``--force``, as for any version rolled out over production).
"""

from __future__ import annotations

from typing import Any

from rayloop.config import Settings
from rayloop.registry import Registry

STAGING = "staging"


def staging_settings(settings: Settings) -> Settings:
    """``settings`` as the staging app runs with them: its own app name, route, replicas; no capture."""
    s = settings.serving
    serving = s.model_copy(
        update={
            "app_name": f"{s.app_name}-{STAGING}",
            "route_prefix": s.staging_route_prefix,
            "replicas": s.staging_replicas,
            "autoscaling": None,  # testers' traffic: a fixed staging_replicas
            "capture": False,
        }
    )
    return settings.model_copy(update={"serving": serving})


def deploy_staging(settings: Settings, ref: str, *, wait: bool = True) -> dict[str, Any]:
    """Serve ``ref`` on the staging route and move ``NAME@staging`` to it; returns what serves where."""
    from rayloop.serving.deploy import serve_model

    staged = staging_settings(settings)
    out = serve_model(staged, ref, app_name=staged.serving.app_name, wait=wait)  # never the endpoint's app
    reg = Registry.from_settings(settings)
    before = reg.get_alias(out["model"], STAGING)
    if before != out["version"]:
        reg.set_alias(
            out["model"],
            STAGING,
            out["version"],
            expect=before or 0,
            actor="rayloop deploy --env staging",
            reason=f"staged on {out['app']}",
        )
    out.update(env=STAGING, alias=f"{out['model']}@{STAGING}", previous_staging=before)
    return out


def undeploy_staging(settings: Settings, name: str) -> dict[str, Any]:
    """Delete the staging app of ``name`` (the ``staging`` alias stays, as every alias does)."""
    from rayloop import cluster
    from rayloop.errors import RolloutError
    from rayloop.serving.app import read_state
    from rayloop.serving.control import ServeControl

    staged = staging_settings(settings)
    app = staged.serving.app_name
    cluster.connect(staged)
    control = ServeControl(staged)
    mine = next((a for a in control.apps() if a["name"] == app), None)
    if mine is not None and read_state(mine).model != name:
        raise RolloutError(f"staging app {app!r} serves model {read_state(mine).model!r}, not {name!r}")
    removed = control.remove(app) if mine is not None else False
    return {"model": name, "app": app, "env": STAGING, "removed": removed}
