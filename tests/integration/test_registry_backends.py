"""Registry on real backends: local disk and S3 (moto server), SQLite and PostgreSQL (a private server).

The servers start once per session on free localhost ports and are stopped by
PID. Multi-process tests use ``spawn`` so each worker is a fresh interpreter
with its own connections, as separate hosts would be.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from rayloop.cli import cli
from rayloop.errors import AliasConflictError, IntegrityError, InUseError, RolloutInProgressError
from rayloop.registry import ABSENT, Registry, RolloutState
from tests.integration.registry_servers import S3_ENV, create_bucket, create_database, moto_s3_server, postgres_server
from tests.registry_util import lock_worker, make_model_dir, race_worker, register_worker

WORKERS = 8


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mpatch:
        for k, v in S3_ENV.items():
            mpatch.setenv(k, v)
        with moto_s3_server() as endpoint:
            yield endpoint


@dataclass
class Backend:
    storage: str
    db: str
    cache: str
    endpoint: str | None

    def registry(self) -> Registry:
        return Registry(self.storage, self.db, cache_dir=self.cache, s3_endpoint=self.endpoint)

    def args(self) -> tuple[str, str, str, str | None]:
        return (self.storage, self.db, self.cache, self.endpoint)


def _backend(request: pytest.FixtureRequest, tmp_path: Path, storage_kind: str, db_kind: str) -> Backend:
    tag = uuid.uuid4().hex[:10]
    endpoint = None
    if storage_kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        create_bucket(endpoint, f"rayloop-{tag}")
        storage = f"s3://rayloop-{tag}/root"
    else:
        storage = str(tmp_path / "storage")
    if db_kind == "postgres":
        db = create_database(request.getfixturevalue("pg_server"), f"rl_{tag}")
    else:
        db = f"sqlite:///{tmp_path / 'registry.db'}"
    return Backend(storage, db, str(tmp_path / "cache"), endpoint)


@pytest.fixture(params=["local+sqlite", "s3+sqlite", "local+postgres", "s3+postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    storage_kind, db_kind = request.param.split("+")
    return _backend(request, tmp_path, storage_kind, db_kind)


def test_round_trip(backend: Backend, tmp_path: Path) -> None:
    reg = backend.registry()
    base_dir = make_model_dir(tmp_path / "base", seed=0)
    tuned_dir = make_model_dir(tmp_path / "tuned", seed=1, shards=2, extra={"tokenizer/merges.txt": b"a b\n"})
    base = reg.register("demo", base_dir, lineage={"code_version": "v0"})
    tuned = reg.register("demo", tuned_dir, parent=1, lineage={"snapshot_id": "snap-1", "metrics": {"loss": 0.7}})
    assert (base.version, tuned.version) == (1, 2)
    assert tuned.uri.startswith(backend.storage.split("://")[0] if backend.endpoint else "/")

    reg.set_alias("demo", "production", 1, expect=ABSENT, actor="test", reason="base")
    reg.set_alias("demo", "candidate", 2)
    with pytest.raises(AliasConflictError):
        reg.set_alias("demo", "production", 2, expect=2)
    reg.set_alias("demo", "production", 2, expect=1, reason="gate passed")
    assert reg.resolve("demo").version == 2
    assert [(e["from"], e["to"]) for e in reg.alias_history("demo", "production")] == [(None, 1), (1, 2)]

    path = reg.fetch("demo")
    for rel in tuned.manifest:
        assert (path / rel).read_bytes() == (tuned_dir / rel).read_bytes()
    reg.verify("demo@2")
    reg.annotate("demo@2", "gate", {"decision": "promote"})
    assert [v.version for v in reg.lineage("demo")] == [2, 1]
    assert reg.lineage("demo")[0].annotations["gate"] == {"decision": "promote"}

    rid = reg.begin_rollout(
        "demo", from_version=1, to_version=2, strategy="canary", plan={"steps": [5, 100]}, owner="t"
    )
    with pytest.raises(RolloutInProgressError):
        reg.begin_rollout("demo", from_version=1, to_version=2, strategy="canary", plan={}, owner="u")
    reg.update_rollout(rid, state=RolloutState(phase="step", percent=5), event={"event": "step"})
    reg.end_rollout(rid, "succeeded")
    assert reg.active_rollout("demo") is None

    # tamper and truncate in storage itself: named in the error
    stored = "models/demo/2/model-00002-of-00002.safetensors"
    original = reg.storage.read_bytes(stored)
    reg.storage.write_bytes(stored, original[:-4] + b"XXXX")
    with pytest.raises(IntegrityError, match=r"model-00002-of-00002\.safetensors") as ei:
        reg.verify("demo@2")
    assert ei.value.path == "model-00002-of-00002.safetensors"
    reg.storage.write_bytes(stored, original[:10])
    with pytest.raises(IntegrityError, match="truncated"):
        reg.fetch("demo@2", tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    reg.storage.write_bytes(stored, original)

    with pytest.raises(InUseError):
        reg.delete("demo@2")
    reg.set_alias("demo", "candidate", 2)
    reg.delete_alias("demo", "candidate")
    reg.set_alias("demo", "production", 1)
    reg.delete("demo@2")
    assert list(reg.storage.list("models/demo/2")) == []
    assert reg.register("demo", base_dir).version == 3
    assert reg.gc("demo", keep=1) == []  # 1 is production, 3 is newest
    assert [v.version for v in reg.list_versions("demo", include_deleted=True)] == [1, 2, 3]


@pytest.mark.parametrize(("storage_kind", "db_kind"), [("local", "sqlite"), ("s3", "postgres")])
def test_concurrent_registrations_get_distinct_versions(
    request: pytest.FixtureRequest, tmp_path: Path, storage_kind: str, db_kind: str
) -> None:
    b = _backend(request, tmp_path, storage_kind, db_kind)
    reg = b.registry()  # creates the schema before the race
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=register_worker, args=(*b.args(), str(tmp_path / "models"), seed, barrier, queue))
        for seed in range(WORKERS)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    assert [r for r in results if r[0] != "ok"] == []
    versions = sorted(r[2] for r in results)
    assert versions == list(range(1, WORKERS + 1))
    stored = {v.version: v for v in reg.list_versions("demo")}
    assert sorted(stored) == versions  # no lost rows
    for _, seed, version, fp in results:
        assert stored[version].fingerprint == fp
        assert stored[version].metadata == {"seed": seed}
    assert len({r[3] for r in results}) == WORKERS
    for v in versions:
        reg.verify(f"demo@{v}")


@pytest.mark.parametrize("db_kind", ["sqlite", "postgres"])
def test_concurrent_alias_moves_and_rollout_lock_exactly_one_wins(
    request: pytest.FixtureRequest, tmp_path: Path, db_kind: str
) -> None:
    b = _backend(request, tmp_path, "local", db_kind)
    reg = b.registry()
    model = make_model_dir(tmp_path / "m")
    for _ in range(WORKERS + 1):
        reg.register("demo", model)
    reg.set_alias("demo", "production", 1)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=race_worker, args=(*b.args(), version, barrier, queue)) for version in range(2, WORKERS + 2)
    ]
    for p in procs:
        p.start()
    results: list[Any] = [queue.get(timeout=300) for _ in range(2 * WORKERS)]
    for p in procs:
        p.join(30)
    assert [r for r in results if r[0] == "error"] == []
    alias_winners = [r[1] for r in results if r[0] == "alias" and r[2] == "won"]
    rollout_winners = [r[1] for r in results if r[0] == "rollout" and r[2] == "won"]
    assert len(alias_winners) == 1 and len(rollout_winners) == 1
    assert reg.get_alias("demo", "production") == alias_winners[0]
    history = reg.alias_history("demo", "production")
    assert [(e["from"], e["to"], e["actor"]) for e in history] == [
        (None, 1, "user"),
        (1, alias_winners[0], f"w{alias_winners[0]}"),
    ]
    active = reg.active_rollout("demo")
    assert active is not None and active.to_version == rollout_winners[0]
    assert len(reg.rollouts("demo")) == 1


def test_cli_on_s3_and_postgres(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = _backend(request, tmp_path, "s3", "postgres")
    monkeypatch.setenv("RAYLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYLOOP_STORAGE", b.storage)
    monkeypatch.setenv("RAYLOOP_REGISTRY_URL", b.db)
    assert b.endpoint is not None
    monkeypatch.setenv("RAYLOOP_S3_ENDPOINT", b.endpoint)
    runner = CliRunner()
    model = make_model_dir(tmp_path / "m")
    out = runner.invoke(cli, ["models", "register", "demo", str(model), "--alias", "production", "--json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(runner.invoke(cli, ["models", "show", "demo", "--json"]).stdout)
    assert shown["uri"].startswith("s3://") and shown["aliases"] == ["production"]
    fetched = json.loads(runner.invoke(cli, ["models", "fetch", "demo", "--json"]).stdout)
    assert Path(fetched["path"]).is_relative_to(tmp_path / "home" / "cache")
    assert runner.invoke(cli, ["models", "verify", "demo"]).exit_code == 0


@pytest.mark.parametrize("db_kind", ["sqlite", "postgres"])
def test_lease_lock_one_holder_across_processes_and_takeover_after_expiry(
    request: pytest.FixtureRequest, tmp_path: Path, db_kind: str
) -> None:
    """The Serve-config lock's primitive on both databases: processes hold it one at a time, every hold has a
    token never handed out before, and a holder that stops renewing (frozen) loses it to the next one."""
    from rayloop.errors import LeaseLostError
    from rayloop.registry.locks import lease_lock
    from rayloop.registry.sql import Database
    from rayloop.registry.tables import ensure_schema

    url = _backend(request, tmp_path, "local", db_kind).db
    db = Database(url)
    ensure_schema(db)
    workers, rounds = 4, 5
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=lock_worker, args=(url, rounds, barrier, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    holds = []
    for _ in range(workers * rounds):
        holds.append(queue.get(timeout=120))
        assert holds[-1][0] != "error", holds[-1]
    for p in procs:
        p.join(30)
    holds.sort(key=lambda h: h[1])
    assert all(a[2] <= b[1] for a, b in itertools.pairwise(holds)), "two holders at once"
    assert [h[3] for h in holds] == list(range(1, workers * rounds + 1))
    with lease_lock(db, "x", ttl_s=0.6, holder="frozen") as frozen:
        frozen._stop.set()  # no more renewals, as in a stopped process
        with lease_lock(db, "x", ttl_s=10, wait_s=30, holder="next") as nxt:
            assert nxt.token == frozen.token + 1
            with pytest.raises(LeaseLostError, match="held by next"):
                frozen.check()
