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


# --- environment variables -------------------------------------------------------


def test_every_setting_has_a_nested_env_var(tmp_path: Path) -> None:
    s = load_settings(
        env={
            "RAYLOOP_HOME": str(tmp_path / "h"),
            "RAYLOOP_SERVING__HTTP_PORT": "9000",
            "RAYLOOP_SERVING__ENGINE__DTYPE": "float16",
            "RAYLOOP_SERVING__CAPTURE": "false",
            "RAYLOOP_ROLLOUT__MIN_SAMPLES": "5",
            "RAYLOOP_ROLLOUT__STRATEGY": "blue-green",
            "RAYLOOP_ROLLOUT__CANARY_STEPS": "[10, 50, 100]",
            "RAYLOOP_TRAINING__ZERO_STAGE": "3",
            "RAYLOOP_TRAINING__LEARNING_RATE": "1e-4",
            "RAYLOOP_GATE__IMPROVE_ON": '["new_facts"]',
            "RAYLOOP_RAY__NUM_CPUS": "8",
            "RAYLOOP_REGISTRY__URL": "postgresql://u@db/rl",
            "RAYLOOP_DEBUG": "1",  # RAYLOOP_ variables that are not settings are left alone
            "RAYLOOP_API_KEYS": "k1,k2",
        }
    )
    assert s.serving.http_port == 9000
    assert s.serving.engine.dtype == "float16"
    assert s.serving.capture is False
    assert s.rollout.min_samples == 5
    assert s.rollout.strategy is Strategy.BLUE_GREEN
    assert s.rollout.canary_steps == [10, 50, 100]
    assert s.training.zero_stage == 3 and s.training.learning_rate == 1e-4
    assert s.gate.improve_on == ["new_facts"]
    assert s.ray.num_cpus == 8
    assert s.registry_url == "postgresql://u@db/rl"
    assert s.storage_root == str(tmp_path / "h" / "storage")


def test_env_var_forms_json_sections_null_empty_and_alias(tmp_path: Path) -> None:
    s = load_settings(
        env={
            "RAYLOOP_SERVING": '{"http_port": 9100, "replicas": 2}',
            "RAYLOOP_SERVING__REPLICAS": "3",  # a nested variable wins over the section's JSON
            "RAYLOOP_TRAINING__BF16": "null",
            "RAYLOOP_RAY__NUM_CPUS": "",  # empty: ignored
            "RAYLOOP_ROLLOUT__MIN_REQUESTS_PER_STEP": "6",
        }
    )
    assert (s.serving.http_port, s.serving.replicas) == (9100, 3)
    assert s.training.bf16 is None and s.ray.num_cpus == 4
    assert s.rollout.min_samples == 6
    # The old spelling from the environment overrides the new one from the file.
    p = _write(tmp_path, "rollout:\n  min_samples: 30\n")
    assert load_settings(p, env={"RAYLOOP_ROLLOUT__MIN_REQUESTS_PER_STEP": "7"}).rollout.min_samples == 7


def test_old_env_var_names_still_work(tmp_path: Path) -> None:
    old = {
        "RAYLOOP_HOME": str(tmp_path / "h"),
        "RAYLOOP_STORAGE": "s3://bucket/prefix",
        "RAYLOOP_S3_ENDPOINT": "http://127.0.0.1:9000",
        "RAYLOOP_REGISTRY_URL": "sqlite:////tmp/r.db",
        "RAY_ADDRESS": "10.0.0.1:6379",
    }
    s = load_settings(env=old)
    assert s.home == str(tmp_path / "h")
    assert s.storage_root == "s3://bucket/prefix"
    assert s.storage.s3_endpoint == "http://127.0.0.1:9000"
    assert s.registry_url == "sqlite:////tmp/r.db"
    assert s.ray.address == "10.0.0.1:6379"
    # Where both are set, the RAYLOOP_SECTION__KEY variable wins.
    s = load_settings(env={**old, "RAYLOOP_RAY__ADDRESS": "ray://head:10001", "RAYLOOP_STORAGE__ROOT": "/data/b"})
    assert s.ray.address == "ray://head:10001" and s.storage_root == "/data/b"


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, "serving:\n  http_port: 8001\n  replicas: 2\ntraining:\n  epochs: 3\n")
    env = {"RAYLOOP_SERVING__HTTP_PORT": "8002", "RAYLOOP_TRAINING__EPOCHS": "4"}
    s = load_settings(p, env=env, overrides={"serving": {"http_port": 8003}})
    assert s.serving.http_port == 8003  # override > env > file
    assert s.training.epochs == 4  # env > file
    assert s.serving.replicas == 2  # file > default
    assert s.ray.num_cpus == 4  # default
    assert load_settings(p, env=env).serving.http_port == 8002
    assert load_settings(p, env={}).serving.http_port == 8001


def test_explicit_env_dict_replaces_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYLOOP_SERVING__HTTP_PORT", "9001")
    monkeypatch.delenv("RAYLOOP_CONFIG", raising=False)
    assert load_settings(env={}).serving.http_port == 8000
    assert load_settings().serving.http_port == 9001


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    p = _write(tmp_path, "serving:\n  http_port: 8001\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p, env={"RAYLOOP_SERVING__HTTP_PORT": "70000"})
    msg = ei.value.message
    assert msg.startswith("invalid settings in environment variable RAYLOOP_SERVING__HTTP_PORT: ")
    assert "65535" in msg and "'70000'" in msg
    assert str(p) not in msg  # the file is fine
    with pytest.raises(ConfigError) as ei:
        load_settings(env={"RAYLOOP_STORAGE": "ftp://host/x"})
    assert "environment variable RAYLOOP_STORAGE: " in ei.value.message and "scheme 'ftp'" in ei.value.message
    with pytest.raises(ConfigError) as ei:
        load_settings(env={"RAYLOOP_SERVING": '{"http_port": 0}'})
    assert "environment variable RAYLOOP_SERVING: serving.http_port: " in ei.value.message


def test_bad_file_value_names_the_file_and_key_even_with_env_set(tmp_path: Path) -> None:
    p = _write(tmp_path, "training:\n  zero_stage: 4\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p, env={"RAYLOOP_SERVING__HTTP_PORT": "9000"})
    msg = ei.value.message
    assert msg.startswith(f"invalid settings in {p}: training.zero_stage: ")
    assert "RAYLOOP_" not in msg
    with pytest.raises(ConfigError) as ei:
        load_settings(p, env={}, overrides={"training": {"zero_stage": 5}})
    assert ei.value.message.startswith("invalid settings in overrides: training.zero_stage: ")


def test_env_typos_and_bad_json_name_the_variable() -> None:
    with pytest.raises(ConfigError) as ei:
        load_settings(env={"RAYLOOP_SERVING__HTTP_PROT": "9000"})
    assert ei.value.message == (
        "invalid settings in environment variable RAYLOOP_SERVING__HTTP_PROT: unknown key 'serving.http_prot'"
    )
    with pytest.raises(ConfigError) as ei:
        load_settings(env={"RAYLOOP_HOME": "/h", "RAYLOOP_ROLLOUT__CANARY_STEPS": "10,50,100"})
    assert "environment variable RAYLOOP_ROLLOUT__CANARY_STEPS: not valid JSON" in ei.value.message
    assert ei.value.hint is not None and "JSON" in ei.value.hint


def test_a_check_over_several_values_names_every_source(tmp_path: Path) -> None:
    p = _write(tmp_path, "ray:\n  port: 16379\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p, env={"RAYLOOP_RAY__NUM_CPUS": "2"})
    assert ei.value.message.startswith(
        f"invalid settings in {p} and environment variable RAYLOOP_RAY__NUM_CPUS: ray: port 16379 is inside"
    )


def test_schema_describes_every_setting_without_benchmark_history() -> None:
    from pydantic import BaseModel

    from rayloop.config import json_schema

    schema = json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["additionalProperties"] is False
    serving = schema["$defs"]["ServingSettings"]
    assert serving["properties"]["http_port"]["maximum"] == 65535

    def fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
        out = []
        for name, f in model.model_fields.items():
            out.append((prefix + name, f.description or ""))
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                out += fields(f.annotation, prefix + name + ".")
        return out

    for path, description in fields(Settings):
        assert description, f"{path} has no description"
        for history in ("benchmark", "measured", "dev machine", "gave "):
            assert history not in description, f"{path}: {description}"


def test_every_rayloop_yaml_in_the_readme_is_valid_settings(tmp_path: Path) -> None:
    """The README's configuration examples load as written (an unknown or misspelt key would be an error)."""
    import re

    from rayloop.config import load_settings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        f = tmp_path / f"block{i}.yaml"
        f.write_text(block)
        s = load_settings(f, env={"RAYLOOP_HOME": str(tmp_path / "home")})
        assert s.storage_root
    cluster = next(b for b in blocks if "autoscaling" in b)
    s = load_settings(tmp_path / f"block{blocks.index(cluster)}.yaml", env={})
    assert s.ray.num_cpus == 0 and s.serving.autoscaling is not None and s.serving.autoscaling.max_replicas == 6
