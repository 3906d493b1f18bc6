"""``rayloop serve``: deploy a model version, or move the running app to another one in place."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rayloop.config import Settings
from rayloop.errors import ConfigError
from rayloop.serving.protocol import ModelConfig, parse_ref


def model_config(settings: Settings, model_ref: str, path: str | None, version: int | None) -> ModelConfig:
    from rayloop.serving.deploy import model_config_for_path, resolve_version

    name, ref = parse_ref(model_ref)
    if path is not None:
        if ref is not None and not ref.isdigit():
            raise ConfigError(f"--path serves a local directory; give --model NAME or NAME@N, not {model_ref!r}")
        return model_config_for_path(name, path, version or (int(ref) if ref else 1))
    if version is not None:
        raise ConfigError("--version only goes with --path; for registry versions use --model NAME@N")
    return resolve_version(settings, model_ref)


def serve_model(
    settings: Settings,
    model_ref: str,
    *,
    path: str | None = None,
    version: int | None = None,
    app_name: str | None = None,
    wait: bool = True,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Deploy ``model_ref`` on the configured cluster (upgrading the app in place if it runs)."""
    from rayloop import cluster
    from rayloop.serving.auth import check_auth_policy, load_key_hashes
    from rayloop.serving.deploy import deploy

    # Keys are hashed here, so the Serve config (visible in the dashboard) never holds them.
    hashes = sorted(load_key_hashes(settings.serving))
    check_auth_policy(settings.serving, hashes)
    cfg = model_config(settings, model_ref, path, version)
    cluster.connect(settings)
    res = deploy(settings, cfg, app_name=app_name, api_key_hashes=hashes, wait=wait, timeout_s=timeout_s)
    out = asdict(res)
    out["url"] = f"{settings.serving.base_url}/v1"
    return out
