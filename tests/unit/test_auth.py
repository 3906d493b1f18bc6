"""Closed by default: no API key and an address other machines reach means no API, unless `auth: none`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from rayloop.config import ServingSettings, Settings
from rayloop.errors import ConfigError
from rayloop.serving.auth import check_auth_policy, hash_key, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("head.internal", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_open_api_beyond_loopback_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError) as e:
        check_auth_policy(ServingSettings(http_host="0.0.0.0"), set())
    assert "'0.0.0.0'" in e.value.message and "will not serve an open API" in e.value.message
    assert "RAYLOOP_API_KEYS" in (e.value.hint or "") and "serving.auth: none" in (e.value.hint or "")


def test_keys_loopback_or_an_explicit_none_start(caplog: pytest.LogCaptureFixture) -> None:
    check_auth_policy(ServingSettings(http_host="0.0.0.0"), {hash_key("k")})
    check_auth_policy(ServingSettings(http_host="127.0.0.1"), set())
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        check_auth_policy(ServingSettings(http_host="0.0.0.0", auth="none"), set())
    assert "without authentication" in caplog.text


def test_the_serve_app_build_fails_closed(tmp_path: Path) -> None:
    from rayloop.serving.app import ServeArgs, build_app

    settings = Settings.model_validate({"home": str(tmp_path), "serving": {"http_host": "0.0.0.0"}})
    with pytest.raises(ConfigError, match="will not serve an open API"):
        build_app(ServeArgs(model="demo", settings=settings))


def test_rayloop_serve_and_deploy_refuse_before_touching_the_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rayloop.cli import cli

    monkeypatch.delenv("RAYLOOP_API_KEYS", raising=False)
    cfg = tmp_path / "rayloop.yaml"
    cfg.write_text(f"home: {tmp_path / 'home'}\nserving:\n  http_host: 0.0.0.0\n")
    for args in (["serve", "--model", "demo@production"], ["deploy", "demo@2", "--strategy", "canary"]):
        r = CliRunner().invoke(cli, ["--config", str(cfg), *args])
        assert r.exit_code != 0 and "will not serve an open API" in r.output, (args, r.output)
