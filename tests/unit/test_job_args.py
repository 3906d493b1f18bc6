"""The `ray job submit` entrypoints share one parser: --config, --set KEY=VALUE, --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayloop.errors import ConfigError
from train_jobs._args import common_parser, job_main, settings_from

pytestmark = pytest.mark.unit


def test_job_flags_override_set_which_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYLOOP_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "rayloop.yaml"
    cfg.write_text("pipeline:\n  model: from-file\n  deploy: true\ntraining:\n  epochs: 1\n")
    ns = common_parser("x").parse_args(
        ["--config", str(cfg), "--set", "training.epochs=3", "--set", "pipeline.model=set"]
    )
    s = settings_from(ns, {"pipeline": {"deploy": False}})
    assert (s.training.epochs, s.pipeline.model, s.pipeline.deploy) == (3, "set", False)
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        settings_from(common_parser("x").parse_args(["--set", "training.epochs"]))


def test_job_main_prints_the_document_and_keeps_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert job_main(lambda: ({"gate": "rejected"}, 2), as_json=True) == 2
    line = capsys.readouterr().out.strip()
    assert line.startswith("RAYLOOP_RESULT ") and json.loads(line.removeprefix("RAYLOOP_RESULT ")) == {
        "gate": "rejected"
    }
    assert job_main(lambda: ({"a": 1}, 0), as_json=False) == 0
    assert json.loads(capsys.readouterr().out) == {"a": 1}

    def broken() -> tuple[dict[str, object], int]:
        raise ConfigError("pipeline.model is not set", hint="Pass --model NAME.")

    assert job_main(broken, as_json=True) == 1
    err = capsys.readouterr()
    assert (
        err.out == "" and "ConfigError: pipeline.model is not set" in err.err and "hint: Pass --model NAME." in err.err
    )


def test_pipeline_and_evaluate_jobs_take_the_shared_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from train_jobs import evaluate, pipeline

    for mod in (pipeline, evaluate):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--set KEY=VALUE" in out and "--json" in out and "--config" in out, out
