import json
from pathlib import Path

import pytest

from rayloop.config import Settings, Strategy, load_settings, settings_from_dict
from rayloop.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rayloop.yaml"
    p.write_text(text)
    return p


def test_defaults_live_under_home(tmp_path: Path) -> None:
    s = load_settings(env={"RAYLOOP_HOME": str(tmp_path / "h")})
    assert s.storage_root == str(tmp_path / "h" / "storage")
    assert s.registry_url == f"sqlite:///{tmp_path / 'h' / 'registry.db'}"
    assert s.ray.address is None
    assert s.ray.num_cpus == 4
    assert s.rollout.strategy is Strategy.CANARY


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, "ray:\n  num_cpus: 3\nstorage:\n  root: /data/a\nrollout:\n  strategy: blue-green\n")
    s = load_settings(p, env={"RAYLOOP_STORAGE": "s3://bucket/prefix", "RAY_ADDRESS": "10.0.0.1:6379"})
    assert s.ray.num_cpus == 3
    assert s.storage_root == "s3://bucket/prefix"
    assert s.ray.address == "10.0.0.1:6379"
    assert s.rollout.strategy is Strategy.BLUE_GREEN
    s2 = load_settings(p, env={}, overrides={"ray": {"num_cpus": 1}})
    assert s2.ray.num_cpus == 1 and s2.storage_root == "/data/a"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    p = _write(tmp_path, "serving:\n  replicass: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p, env={})
    assert "unknown key 'serving.replicass'" in ei.value.message
    assert str(p) in ei.value.message


def test_bad_yaml_says_where(tmp_path: Path) -> None:
    p = _write(tmp_path, "ray:\n  num_cpus: [1,\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p, env={})
    assert "not valid YAML" in ei.value.message and "line" in ei.value.message


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(_write(tmp_path, "- a\n- b\n"), env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", env={})


@pytest.mark.parametrize(
    ("root", "fragment"),
    [("ftp://host/x", "scheme 'ftp'"), ("s3://", "names no bucket"), ("   ", "empty")],
)
def test_bad_storage_uri(root: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        settings_from_dict({"storage": {"root": root}})
    assert fragment in ei.value.message


def test_good_storage_uris() -> None:
    for root in ("/tmp/x", "relative/dir", "s3://b/p", "gs://b", "file:///tmp/y"):
        assert settings_from_dict({"storage": {"root": root}}).storage_root == root


def test_bad_registry_url() -> None:
    with pytest.raises(ConfigError, match="mysql"):
        settings_from_dict({"registry": {"url": "mysql://u@h/db"}})


@pytest.mark.parametrize("steps", [[], [5, 5, 100], [50, 25, 100], [5, 25], [0, 100], [5, 150]])
def test_bad_canary_steps(steps: list[int]) -> None:
    with pytest.raises(ConfigError, match="canary_steps"):
        settings_from_dict({"rollout": {"canary_steps": steps}})


def test_wrong_types_name_field_and_value() -> None:
    with pytest.raises(ConfigError) as ei:
        settings_from_dict({"ray": {"num_cpus": "many"}, "training": {"zero_stage": 4}})
    msg = ei.value.message
    assert "ray.num_cpus" in msg and "'many'" in msg
    assert "training.zero_stage" in msg


def test_unknown_strategy() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.strategy"):
        settings_from_dict({"rollout": {"strategy": "yolo"}})


def test_dump_round_trips() -> None:
    s = Settings()
    assert settings_from_dict(s.dump()) == s


def test_head_port_inside_rays_worker_range_is_refused_before_start(tmp_path: Path) -> None:
    p = _write(tmp_path, "ray:\n  port: 16379\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p, env={})
    assert "port 16379 is inside the ports Ray keeps" in ei.value.message and "10001-19999" in ei.value.message
    assert load_settings(_write(tmp_path, "ray:\n  port: 26379\n"), env={}).ray.port == 26379


def test_config_show_never_prints_a_password(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rayloop.cli import cli
    from rayloop.config import redact_url

    assert (
        redact_url("postgresql://rayloop:s3cr3t@db.internal:5432/rl") == "postgresql://rayloop:***@db.internal:5432/rl"
    )
    assert redact_url("postgresql://rayloop@db.internal/rl") == "postgresql://rayloop@db.internal/rl"
    assert redact_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    cfg = tmp_path / "rayloop.yaml"
    cfg.write_text(f"home: {tmp_path}\nregistry:\n  url: postgresql://rayloop:s3cr3t@db.internal/rl\n")
    r = CliRunner().invoke(cli, ["--config", str(cfg), "config", "show"])
    assert r.exit_code == 0 and "s3cr3t" not in r.output
    assert json.loads(r.output)["registry"]["url"] == "postgresql://rayloop:***@db.internal/rl"
