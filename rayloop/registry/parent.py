"""The parent model a snapshot is tokenized for and a candidate is trained from."""

from __future__ import annotations

from pathlib import Path

from rayloop.config import Settings
from rayloop.errors import ConfigError


def resolve_parent(settings: Settings, model: str | None, base: str | None) -> tuple[Path, str | None]:
    """``(model directory, model name)``: ``base`` as a directory or a registry ref (``NAME@REF``, fetched),
    else the base model ``rayloop init`` builds (``$RAYLOOP_HOME/base-model``)."""
    if base and Path(base).is_dir():
        return Path(base), model
    if base:
        from rayloop.registry import Registry

        reg = Registry.from_settings(settings)
        mv = reg.resolve(base)
        return reg.fetch(base), model or mv.name
    d = settings.base_model_path
    if not (d / "config.json").is_file():
        raise ConfigError(
            f"no parent model given and no base model in {str(d)!r}",
            hint="Pass --base NAME@REF (a registry version) or a model directory, or run `rayloop init`.",
        )
    return d, model
