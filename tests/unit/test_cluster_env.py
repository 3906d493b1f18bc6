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


def test_the_head_keeps_rays_token_auth_on_with_an_owner_only_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rayloop.cluster import ClusterState, ensure_auth_token

    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    token = ensure_auth_token(settings)
    assert token == tmp_path / ".rayloop" / "ray-auth-token" and (token.stat().st_mode & 0o777) == 0o600
    first = token.read_text()
    assert len(first) >= 32 and ensure_auth_token(settings).read_text() == first  # kept across `up`s
    # Whatever the caller's shell says, the head gets token mode and the token file (and no stray token).
    env = head_env(settings, {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "someone-else"}, token=token)
    assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN_PATH"]) == ("token", str(token))
    assert "RAY_AUTH_TOKEN" not in env
    assert head_env(settings, {"RAY_AUTH_TOKEN_PATH": "x"})["RAY_AUTH_MODE"] == "disabled"  # ray.auth: disabled
    assert settings.ray.auth == "token"
    state = ClusterState(pid=1, address="a", dashboard_url="u", temp_dir="t", started_at=0, auth_token_path=str(token))
    assert state.auth_env() == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def test_up_writes_a_prometheus_scrape_config_for_the_heads_metrics_port(tmp_path: Path) -> None:
    import yaml

    from rayloop.cluster import write_prometheus_config

    settings = load_settings(env={"RAYLOOP_HOME": str(tmp_path)}, overrides={"ray": {"metrics_export_port": 9311}})
    path = write_prometheus_config(settings)
    assert path == tmp_path / "monitoring" / "prometheus.yml"
    [job] = yaml.safe_load(path.read_text())["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9311"]
    with pytest.raises(Exception, match="metrics_export_port 10500"):
        load_settings(env={}, overrides={"ray": {"metrics_export_port": 10500}})


def test_the_heads_saved_state_lives_where_ray_gcs_storage_path_says_and_down_forgets_it(tmp_path: Path) -> None:
    """A head that died comes back from ray.gcs_storage_path (the multi-node test kills one); `rayloop down` is
    a deliberate stop: it removes the saved state, so the next `rayloop up` starts an empty cluster."""
    import json
    import subprocess
    import threading
    from dataclasses import asdict

    from rayloop.cluster import ClusterState, down, gcs_storage_dir

    assert gcs_storage_dir(load_settings(env={"RAYLOOP_HOME": str(tmp_path)})) is None  # default: in memory
    settings = load_settings(env={"RAYLOOP_HOME": str(tmp_path)}, overrides={"ray": {"gcs_storage_path": "gcs"}})
    store = gcs_storage_dir(settings)
    assert store == tmp_path / "gcs"
    elsewhere = load_settings(env={"RAYLOOP_HOME": str(tmp_path)}, overrides={"ray": {"gcs_storage_path": "/srv/gcs"}})
    assert gcs_storage_dir(elsewhere) == Path("/srv/gcs")
    # `down` of a running head: a process in a session of its own stands in for rayloop's supervisor.
    store.mkdir()
    (store / "session_name").write_text("session_x")
    head = subprocess.Popen(["sleep", "120"], start_new_session=True)
    reaper = threading.Thread(target=head.wait)  # reaped once it ends (a zombie would still look alive)
    reaper.start()
    try:
        state = ClusterState(
            pid=head.pid,
            address="a",
            dashboard_url="u",
            temp_dir="t",
            started_at=0,
            supervised=True,
            gcs_storage_path=str(store),
        )
        (tmp_path / "cluster.json").write_text(json.dumps(asdict(state)))
        assert down(settings)
        reaper.join(30)
        assert head.returncode == -15  # SIGTERM, as the supervisor gets it
    finally:
        if head.returncode is None:
            head.kill()
        reaper.join()
    assert not store.exists() and not (tmp_path / "cluster.json").exists()


def test_a_head_that_died_but_is_not_reaped_yet_is_not_running() -> None:
    """Killed with its machine's other processes, the supervisor may linger as a zombie until something reaps
    it: `rayloop up` must start a new head then, not report the dead one as running."""
    import os
    import subprocess
    import time

    from rayloop.cluster import ClusterState

    head = subprocess.Popen(["sleep", "120"])
    try:
        state = ClusterState(pid=head.pid, address="a", dashboard_url="u", temp_dir="t", started_at=0)
        assert state.alive()
        head.kill()  # not reaped: a zombie until head.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and state.alive():
            time.sleep(0.05)
        os.kill(head.pid, 0)  # the pid still exists...
        assert not state.alive()  # ...but the head is gone
    finally:
        head.kill()
        head.wait()


@pytest.mark.parametrize("include_gitignore", [True, False], ids=["ray-default", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"])
def test_a_job_submitted_from_the_homes_directory_packs_none_of_the_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, include_gitignore: bool
) -> None:
    """`ray job submit --working-dir .` where `.rayloop` lives: Ray's own packaging leaves the home out, so a log
    line or a database write there neither changes the package nor ships the home's files with the job."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package, get_uri_for_directory

    from rayloop.cluster import ensure_home

    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    (tmp_path / "rayloop.yaml").write_text("serving: {replicas: 1}\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "mine.py").write_text("print('hello')\n")
    home = ensure_home(settings)
    assert home == tmp_path / ".rayloop"
    (home / "ray-auth-token").write_text("secret")
    (home / "logs").mkdir()
    (home / "logs" / "head.log").write_text("one line\n")

    def uri() -> str:
        return get_uri_for_directory(str(tmp_path), include_gitignore=include_gitignore)

    before = uri()
    (home / "logs" / "head.log").write_text("one line\nand another\n")
    (home / "registry.db").write_bytes(b"\0" * 1024)
    assert uri() == before  # the home changed, the package did not
    package = tmp_path.parent / f"{tmp_path.name}-pkg.zip"
    create_package(str(tmp_path), package, include_gitignore=include_gitignore)
    names = zipfile.ZipFile(package).namelist()
    assert "rayloop.yaml" in names and "jobs/mine.py" in names, names
    assert not [n for n in names if n.startswith(".rayloop/") and n != ".rayloop/"], names
    (tmp_path / "rayloop.yaml").write_text("serving: {replicas: 2}\n")
    assert uri() != before  # what the job does use still counts


def test_ensure_home_keeps_ignore_files_a_user_wrote(tmp_path: Path) -> None:
    from rayloop.cluster import HOME_IGNORE, ensure_home

    settings = load_settings(env={}, overrides={"home": str(tmp_path / "home")})
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".gitignore").write_text("logs/\n")
    ensure_home(settings)
    assert (tmp_path / "home" / ".gitignore").read_text() == "logs/\n"
    assert (tmp_path / "home" / ".rayignore").read_text() == HOME_IGNORE
