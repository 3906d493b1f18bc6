"""`rayloop models ...` through click's CliRunner on a fresh RAYLOOP_HOME."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from rayloop.cli import cli
from tests.registry_util import make_model_dir

VERSION_KEYS = {
    "name",
    "version",
    "ref",
    "fingerprint",
    "manifest",
    "size_bytes",
    "created_at",
    "created_by",
    "parent",
    "metadata",
    "lineage",
    "annotations",
    "uri",
    "aliases",
    "deleted_at",
}


@pytest.fixture
def run(rayloop_home: Path) -> Any:
    runner = CliRunner()

    def _run(*args: str, ok: bool = True) -> Result:
        result = runner.invoke(cli, ["models", *args])
        if ok:
            assert result.exit_code == 0, (result.output, result.stderr, result.exception)
        return result

    return _run


def _json(result: Result) -> Any:
    return json.loads(result.stdout)


def test_register_show_list_json(run: Any, tmp_path: Path) -> None:
    m = make_model_dir(tmp_path / "m")
    out = _json(
        run("register", "demo", str(m), "--meta", "team=ml", "--meta", "n=3", "--lineage", "snapshot_id=s1", "--json")
    )
    assert set(out) == VERSION_KEYS
    assert (out["ref"], out["metadata"], out["lineage"]) == ("demo@1", {"team": "ml", "n": 3}, {"snapshot_id": "s1"})
    assert out["created_by"].startswith("cli")
    out2 = _json(run("register", "demo", str(m), "--parent", "1", "--alias", "production", "--json"))
    assert (out2["version"], out2["parent"], out2["aliases"]) == (2, 1, ["production"])

    shown = _json(run("show", "demo", "--json"))
    assert shown["ref"] == "demo@2" and set(shown) == VERSION_KEYS
    assert _json(run("show", "demo@1", "--json"))["manifest"] == out["manifest"]

    models = _json(run("list", "--json"))
    assert models == [{"name": "demo", "versions": 2, "latest": 2, "aliases": {"production": 2}}]
    versions = _json(run("list", "demo", "--json"))
    assert [v["version"] for v in versions] == [1, 2]
    assert all(set(v) == VERSION_KEYS for v in versions)

    lineage = _json(run("lineage", "demo@2", "--json"))
    assert [v["ref"] for v in lineage] == ["demo@2", "demo@1"]

    # human output: tables, no JSON
    assert "demo" in run("list").stdout
    assert "fingerprint" in run("show", "demo@1").stdout
    assert "demo@1" in run("lineage", "demo").stdout


def test_alias_history_verify_fetch_delete_gc(run: Any, tmp_path: Path) -> None:
    m = make_model_dir(tmp_path / "m")
    for _ in range(4):
        run("register", "demo", str(m))
    assert _json(run("alias", "demo", "production", "1", "--expect", "none", "--json")) == {
        "name": "demo",
        "alias": "production",
        "version": 1,
        "previous": None,
    }
    moved = _json(run("alias", "demo", "production", "2", "--expect", "1", "--reason", "better", "--json"))
    assert moved["previous"] == 1
    log = _json(run("history", "demo", "--json"))
    assert [set(e) for e in log] == [{"time", "name", "alias", "from", "to", "actor", "reason"}] * 2
    assert log[-1]["reason"] == "better"

    assert _json(run("verify", "demo@2", "--json")) | {"files": 0, "size_bytes": 0} == {
        "ref": "demo@2",
        "ok": True,
        "files": 0,
        "size_bytes": 0,
    }
    fetched = _json(run("fetch", "demo", "--json"))
    assert fetched["ref"] == "demo@2" and (Path(fetched["path"]) / "config.json").is_file()

    assert _json(run("delete", "demo@3", "--json")) == {"ref": "demo@3", "deleted": True}
    assert _json(run("gc", "demo", "--keep", "1", "--dry-run", "--json")) == {
        "name": "demo",
        "deleted": [1],
        "dry_run": True,
    }
    assert _json(run("gc", "demo", "--keep", "1", "--json")) == {"name": "demo", "deleted": [1], "dry_run": False}
    assert _json(run("annotate", "demo@2", "gate", '{"decision": "promote"}', "--json")) == {
        "ref": "demo@2",
        "key": "gate",
    }
    assert _json(run("show", "demo@2", "--json"))["annotations"]["gate"] == {"decision": "promote"}
    assert _json(run("alias", "demo", "production", "--delete", "--json"))["previous"] == 2


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["show", "ghost@1"], "NotFoundError: model 'ghost' does not exist"),
        (["show", "../x@1"], "InvalidNameError"),
        (["show", "demo@7"], "NotFoundError: version demo@7 does not exist"),
        (["show", "demo"], "NotFoundError: alias 'production' of model 'demo' is not set"),
        (["alias", "demo", "production", "1", "--expect", "3"], "AliasConflictError"),
        (["alias", "demo", "latest", "1"], "InvalidNameError"),
        (["delete", "demo@1"], "InUseError"),
        (["lineage", "demo@9"], "NotFoundError"),
    ],
)
def test_errors_exit_nonzero_with_message_on_stderr(run: Any, tmp_path: Path, args: list[str], error: str) -> None:
    m = make_model_dir(tmp_path / "m")
    run("register", "demo", str(m))
    if args[0] in ("alias", "delete"):
        run("alias", "demo", "canary", "1")
    result = run(*args, ok=False)
    assert result.exit_code == 1
    assert error in result.stderr
    assert "hint:" in result.stderr
    assert result.stdout == ""


def test_register_refusals_on_cli(run: Any, tmp_path: Path) -> None:
    m = make_model_dir(tmp_path / "m", extra={"pytorch_model.bin": b"pickle"})
    result = run("register", "demo", str(m), ok=False)
    assert result.exit_code == 1 and "UnsafeArtifactError" in result.stderr
    result = run("register", "demo", str(tmp_path), "--meta", "novalue", ok=False)
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr
    result = run("alias", "demo", "production", ok=False)
    assert result.exit_code == 2 and "VERSION or --delete" in result.stderr


def test_verify_reports_tampering(run: Any, tmp_path: Path, rayloop_home: Path) -> None:
    m = make_model_dir(tmp_path / "m")
    run("register", "demo", str(m))
    stored = rayloop_home / "storage" / "models" / "demo" / "1" / "config.json"
    stored.write_text("{}")
    result = run("verify", "demo@1", ok=False)
    assert result.exit_code == 1
    assert "IntegrityError" in result.stderr and "config.json" in result.stderr


def test_help_documents_json_keys(run: Any) -> None:
    out = run("--help").stdout
    assert "--json output" in out and "fingerprint" in out and "REF is" in out
