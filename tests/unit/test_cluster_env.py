"""The head `rayloop up` starts hands its jobs rayloop's Python and this home's storage and registry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rayloop.cluster import head_env
from rayloop.config import load_settings


def test_jobs_inherit_the_venv_and_absolute_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})  # the embedded default: ./.rayloop
    env = head_env(settings, {"PATH": "/usr/bin:/bin", "RAYLOOP_STORAGE": "ignored-by-settings"})
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["RAYLOOP_HOME"] == str(tmp_path / ".rayloop")
    assert env["RAYLOOP_STORAGE"] == str(tmp_path / ".rayloop" / "storage")
    assert env["RAYLOOP_REGISTRY_URL"] == f"sqlite:///{tmp_path / '.rayloop' / 'registry.db'}"
    # Called again on its own output, nothing doubles.
    assert head_env(settings, env)["PATH"] == env["PATH"]


def test_a_relative_storage_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={}, overrides={"storage": {"root": "data/store"}})
    assert head_env(settings, {})["RAYLOOP_STORAGE"] == str(tmp_path / "data" / "store")
    s3 = load_settings(env={}, overrides={"storage": {"root": "s3://bucket/rl"}})
    assert head_env(s3, {})["RAYLOOP_STORAGE"] == "s3://bucket/rl"
