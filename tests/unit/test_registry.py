"""Registry behaviour on local storage + SQLite (fast: tiny fake HF directories)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest

from rayloop.config import Settings
from rayloop.errors import (
    AliasConflictError,
    IntegrityError,
    InUseError,
    InvalidNameError,
    NotFoundError,
    RegistryError,
    RolloutError,
    RolloutInProgressError,
    UnsafeArtifactError,
)
from rayloop.registry import ABSENT, ModelVersion, Registry, RolloutState
from rayloop.storage import Storage
from tests.registry_util import make_model_dir


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "storage"), f"sqlite:///{tmp_path / 'reg.db'}", cache_dir=tmp_path / "cache")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "m0", seed=0, extra={"sub/notes.txt": b"hello"})


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _stored(reg: Registry, mv: ModelVersion, rel: str) -> Path:
    return Path(reg.storage.path(f"models/{mv.name}/{mv.version}/{rel}"))


# -- register / resolve --------------------------------------------------------
def test_register_round_trip(reg: Registry, model: Path, tmp_path: Path) -> None:
    mv = reg.register(
        "demo", model, metadata={"owner": "me"}, lineage={"snapshot_id": "snap-1", "metrics": {"loss": 1.5}}
    )
    assert (mv.name, mv.version, mv.parent) == ("demo", 1, None)
    files = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    assert sorted(mv.manifest) == files
    for rel, entry in mv.manifest.items():
        assert entry == {"sha256": _sha(model / rel), "size": (model / rel).stat().st_size}
        assert _sha(_stored(reg, mv, rel)) == entry["sha256"]
    doc = json.loads(_stored(reg, mv, "manifest.json").read_text())
    assert doc["fingerprint"] == mv.fingerprint and doc["files"] == mv.manifest
    assert mv.uri == reg.storage.uri_of("models/demo/1")
    assert mv.metadata == {"owner": "me"}
    assert mv.lineage == {"snapshot_id": "snap-1", "metrics": {"loss": 1.5}}
    assert reg.resolve("demo@1") == mv
    assert reg.resolve("demo@latest").version == 1

    fetched = reg.fetch("demo@1")
    for rel in files:
        assert (fetched / rel).read_bytes() == (model / rel).read_bytes()


def test_register_fetch_and_verify_report_progress_in_bytes(reg: Registry, model: Path, tmp_path: Path) -> None:
    """Every byte copied or hashed is reported once (the CLI draws its progress bars from this)."""
    import threading

    def counter() -> tuple[list[int], Any]:
        seen: list[int] = []
        lock = threading.Lock()

        def add(n: int) -> None:
            with lock:
                seen.append(n)

        return seen, add

    total = sum(p.stat().st_size for p in model.rglob("*") if p.is_file() and not p.name.startswith("."))
    registered, add = counter()
    mv = reg.register("demo", model, progress=add)
    assert sum(registered) == total == mv.size_bytes and all(n > 0 for n in registered)
    verified, add = counter()
    reg.verify(mv.ref, progress=add)
    assert sum(verified) == total
    fetched, add = counter()
    reg.fetch(mv.ref, tmp_path / "copy", progress=add)
    assert sum(fetched) == total


def test_same_content_same_fingerprint_new_version(reg: Registry, model: Path, tmp_path: Path) -> None:
    a = reg.register("demo", model)
    b = reg.register("demo", model, parent=1)
    c = reg.register("demo", make_model_dir(tmp_path / "other", seed=1), parent=2)
    assert [a.version, b.version, c.version] == [1, 2, 3]
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert reg.fetch("demo@1") == reg.fetch("demo@2")  # one cached copy per content


def test_replicas_starting_together_on_one_node_share_one_download(
    reg: Registry, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four replicas of a node fetch one version at once: one download, all four get the verified copy."""
    import threading

    from rayloop.registry import artifacts

    mv = reg.register("demo", model)
    real = artifacts.download_verified
    downloads: list[str] = []
    started = threading.Event()

    resolved = threading.Semaphore(0)
    real_resolve = reg.resolve

    def counting_resolve(ref: Any) -> ModelVersion:
        resolved.release()
        return real_resolve(ref)

    def slow_download(*a: Any, **kw: Any) -> None:
        downloads.append(mv.ref)
        started.set()
        for _ in range(4):  # every replica has asked for the version while this download runs
            assert resolved.acquire(timeout=30)
        time.sleep(0.2)  # a download takes a while: the others look for the copy meanwhile
        real(*a, **kw)

    monkeypatch.setattr(reg, "resolve", counting_resolve)
    monkeypatch.setattr(artifacts, "download_verified", slow_download)
    got: list[Path] = []
    first = threading.Thread(target=lambda: got.append(reg.fetch(mv.ref)))
    first.start()
    assert started.wait(30)
    others = [threading.Thread(target=lambda: got.append(reg.fetch(mv.ref))) for _ in range(3)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(60)
    assert downloads == [mv.ref]
    assert len(got) == 4 and len(set(got)) == 1
    assert artifacts.local_copy_ok(got[0], mv.manifest, rehash=True)


def test_versions_are_never_reused_after_delete(reg: Registry, model: Path) -> None:
    reg.register("demo", model)
    reg.register("demo", model)
    reg.delete("demo@2")
    assert reg.register("demo", model).version == 3
    assert [v.version for v in reg.list_versions("demo")] == [1, 3]
    assert [v.version for v in reg.list_versions("demo", include_deleted=True)] == [1, 2, 3]
    with pytest.raises(NotFoundError, match="was deleted"):
        reg.resolve("demo@2")


def test_versions_are_per_name(reg: Registry, model: Path) -> None:
    assert reg.register("a", model).version == 1
    assert reg.register("b", model).version == 1
    assert reg.register("a", model).version == 2
    assert reg.list_models() == ["a", "b"]


@pytest.mark.parametrize("bad", ["pytorch_model.bin", "model.pt", "w.pth", "state.pkl", "last.ckpt", "sub/opt.pt"])
def test_pickle_weights_are_refused(reg: Registry, tmp_path: Path, bad: str) -> None:
    d = make_model_dir(tmp_path / "m", extra={bad: b"\x80\x04pickle"})
    with pytest.raises(UnsafeArtifactError, match="safetensors"):
        reg.register("demo", d)
    assert reg.list_models() == []


def test_refusals_for_incomplete_dirs(reg: Registry, tmp_path: Path) -> None:
    no_weights = make_model_dir(tmp_path / "a")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(UnsafeArtifactError, match=r"no \*\.safetensors"):
        reg.register("demo", no_weights)
    no_config = make_model_dir(tmp_path / "b")
    (no_config / "config.json").unlink()
    with pytest.raises(UnsafeArtifactError, match=r"config\.json"):
        reg.register("demo", no_config)
    garbage = make_model_dir(tmp_path / "c")
    (garbage / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(UnsafeArtifactError, match="not a valid safetensors"):
        reg.register("demo", garbage)
    own_manifest = make_model_dir(tmp_path / "d", extra={"manifest.json": b"{}"})
    with pytest.raises(UnsafeArtifactError, match=r"manifest\.json"):
        reg.register("demo", own_manifest)
    with pytest.raises(NotFoundError, match="does not exist"):
        reg.register("demo", tmp_path / "nope")


def test_bad_names_and_arguments_are_refused(reg: Registry, model: Path) -> None:
    for name in ["../evil", "a/b", "", "x" * 100]:
        with pytest.raises(InvalidNameError):
            reg.register(name, model)
    with pytest.raises(NotFoundError, match="demo@7"):
        reg.register("demo", model, parent=7)
    with pytest.raises(RegistryError, match="lineage"):
        reg.register("demo", model, lineage={"snapshot": "typo"})
    with pytest.raises(RegistryError, match="JSON"):
        reg.register("demo", model, metadata={"x": object()})
    with pytest.raises(NotFoundError, match="model 'ghost' does not exist"):
        reg.resolve("ghost@1")
    reg.register("demo", model)
    with pytest.raises(NotFoundError, match="demo@9 does not exist"):
        reg.resolve("demo@9")


def test_hidden_files_are_skipped(reg: Registry, tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "m", extra={".git/HEAD": b"ref", ".DS_Store": b"x"})
    mv = reg.register("demo", d)
    assert not any(p.startswith(".") or "/." in p for p in mv.manifest)


class _FailingStorage(Storage):
    """Storage whose manifest write fails: the upload got half way."""

    def write_bytes(self, key: str, data: bytes) -> None:
        raise OSError("disk full")


def test_failed_upload_leaves_no_visible_version(tmp_path: Path, model: Path) -> None:
    db = f"sqlite:///{tmp_path / 'reg.db'}"
    broken = Registry(_FailingStorage(str(tmp_path / "storage")), db, cache_dir=tmp_path / "cache")
    with pytest.raises(OSError, match="disk full"):
        broken.register("demo", model)
    assert broken.list_models() == []
    assert not Path(broken.storage.path("models/demo/1")).exists()
    with pytest.raises(NotFoundError):
        broken.resolve("demo@1")
    good = Registry(str(tmp_path / "storage"), db, cache_dir=tmp_path / "cache")
    assert good.register("demo", model).version == 2  # the number the failure took is not reused


# -- integrity -----------------------------------------------------------------
def test_tampered_stored_file_is_refused_by_fetch_and_verify(reg: Registry, model: Path) -> None:
    mv = reg.register("demo", model)
    reg.verify("demo@1")
    p = _stored(reg, mv, "model.safetensors")
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.safetensors.*modified") as ei:
        reg.verify("demo@1")
    assert ei.value.path == "model.safetensors"
    with pytest.raises(IntegrityError, match=r"model\.safetensors") as ei:
        reg.fetch("demo@1")
    assert ei.value.path == "model.safetensors"
    # nothing half-written became visible in the cache
    assert not (reg.cache_dir / "models" / mv.fingerprint).exists()


def test_truncated_and_missing_files_are_named(reg: Registry, model: Path) -> None:
    mv = reg.register("demo", model)
    p = _stored(reg, mv, "sub/notes.txt")
    p.write_bytes(b"he")
    with pytest.raises(IntegrityError, match=r"'sub/notes\.txt' is truncated: 2 bytes, manifest says 5"):
        reg.fetch("demo@1")
    with pytest.raises(IntegrityError, match="truncated"):
        reg.verify("demo@1")
    p.unlink()
    with pytest.raises(IntegrityError, match=r"'sub/notes\.txt' is missing"):
        reg.fetch("demo@1")
    with pytest.raises(IntegrityError, match=r"'sub/notes\.txt' is missing"):
        reg.verify("demo@1")


def test_unexpected_stored_file_fails_verify(reg: Registry, model: Path) -> None:
    mv = reg.register("demo", model)
    _stored(reg, mv, "pytorch_model.bin").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match=r"unexpected file 'pytorch_model\.bin'"):
        reg.verify("demo@1")


def test_modified_cache_copy_is_replaced(reg: Registry, model: Path) -> None:
    reg.register("demo", model)
    path = reg.fetch("demo@1")
    assert reg.fetch("demo@1") == path  # cache hit
    (path / "model.safetensors").write_bytes(b"tampered")
    again = reg.fetch("demo@1")
    assert again == path
    assert (again / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    (again / "pytorch_model.bin").write_bytes(b"dropped in")
    assert not (reg.fetch("demo@1") / "pytorch_model.bin").exists()


def test_rehash_catches_same_size_same_mtime_edit(reg: Registry, model: Path) -> None:
    reg.register("demo", model)
    path = reg.fetch("demo@1")
    f = path / "config.json"
    st = f.stat()
    f.write_bytes(b"X" * st.st_size)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    reg.fetch("demo@1", rehash=True)
    assert f.read_bytes() == (model / "config.json").read_bytes()


def test_fetch_to_dest(reg: Registry, model: Path, tmp_path: Path) -> None:
    reg.register("demo", model)
    dest = tmp_path / "out" / "model"
    assert reg.fetch("demo@1", dest) == dest
    assert (dest / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert reg.fetch("demo@1", dest) == dest
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("do not clobber")
    with pytest.raises(RegistryError, match="not empty"):
        reg.fetch("demo@1", busy)
    assert (busy / "mine.txt").read_text() == "do not clobber"


# -- aliases -------------------------------------------------------------------
def test_aliases_cas_and_audit_log(reg: Registry, model: Path) -> None:
    for _ in range(3):
        reg.register("demo", model)
    with pytest.raises(NotFoundError, match="alias 'production' of model 'demo' is not set"):
        reg.resolve("demo")
    assert reg.set_alias("demo", "production", 1, expect=ABSENT, actor="alice", reason="first") is None
    with pytest.raises(AliasConflictError, match="already points to version 1"):
        reg.set_alias("demo", "production", 2, expect=ABSENT)
    assert reg.resolve("demo").version == 1
    assert reg.set_alias("demo", "production", 2, expect=1, actor="bob", reason="better") == 1
    with pytest.raises(AliasConflictError, match="points to version 2, not version 1"):
        reg.set_alias("demo", "production", 3, expect=1)
    reg.set_alias("demo", "production", 3)  # expect=None: don't care
    reg.set_alias("demo", "canary", 3)
    assert reg.get_alias("demo", "production") == 3
    assert reg.get_alias("demo", "shadow") is None
    assert reg.aliases("demo") == {"canary": 3, "production": 3}
    assert reg.resolve("demo@3").aliases == ["canary", "production"]
    with pytest.raises(AliasConflictError):
        reg.delete_alias("demo", "canary", expect=2)
    assert reg.delete_alias("demo", "canary", expect=3, actor="carol", reason="done") == 3
    with pytest.raises(NotFoundError):
        reg.delete_alias("demo", "canary")

    log = reg.alias_history("demo", "production")
    assert [(e["from"], e["to"], e["actor"], e["reason"]) for e in log] == [
        (None, 1, "alice", "first"),
        (1, 2, "bob", "better"),
        (2, 3, "user", ""),
    ]
    assert all(e["time"] and e["alias"] == "production" for e in log)
    assert reg.alias_history("demo")[-1] | {"time": None} == {
        "time": None,
        "name": "demo",
        "alias": "canary",
        "from": 3,
        "to": None,
        "actor": "carol",
        "reason": "done",
    }


def test_alias_refusals(reg: Registry, model: Path) -> None:
    reg.register("demo", model)
    with pytest.raises(NotFoundError, match="demo@5"):
        reg.set_alias("demo", "production", 5)
    with pytest.raises(NotFoundError, match="model 'ghost'"):
        reg.set_alias("ghost", "production", 1)
    for bad in ["3", "latest", "../x", ""]:
        with pytest.raises(InvalidNameError):
            reg.set_alias("demo", bad, 1)


# -- lineage / annotations -----------------------------------------------------
def test_lineage_walks_back_to_base_even_past_deleted(reg: Registry, model: Path) -> None:
    reg.register("demo", model, lineage={"code_version": "base"})
    reg.register("demo", model, parent=1, lineage={"snapshot_id": "s1", "training_config": {"lr": 1e-3}})
    reg.register("demo", model, parent=2, lineage={"snapshot_id": "s2", "metrics": {"loss": 0.5}})
    reg.delete("demo@2")
    chain = reg.lineage("demo@3")
    assert [v.version for v in chain] == [3, 2, 1]
    assert chain[1].deleted_at is not None and chain[1].lineage["snapshot_id"] == "s1"
    assert chain[2].lineage == {"code_version": "base"}
    reg.register("demo", model, parent=2)  # a deleted version can still be a parent


def test_annotate(reg: Registry, model: Path) -> None:
    mv = reg.register("demo", model)
    reg.annotate("demo@1", "evaluation", {"accuracy": 0.9, "n": 100}, actor="gate")
    reg.annotate("demo@1", "gate", {"decision": "promote"})
    reg.annotate("demo@1", "gate", {"decision": "reject"})
    notes = reg.resolve("demo@1").annotations
    assert notes["evaluation"] == {"accuracy": 0.9, "n": 100}
    assert notes["gate"] == {"decision": "reject"}
    assert [e["actor"] for e in notes["_log"]] == ["gate", "user", "user"]
    assert reg.resolve("demo@1").manifest == mv.manifest  # artifacts untouched
    with pytest.raises(RegistryError, match="JSON"):
        reg.annotate("demo@1", "bad", {1, 2})
    with pytest.raises(InvalidNameError):
        reg.annotate("demo@1", "_log", 1)


# -- delete / deployments / gc -------------------------------------------------
def test_delete_refuses_versions_in_use(reg: Registry, model: Path) -> None:
    for _ in range(3):
        reg.register("demo", model)
    reg.set_alias("demo", "production", 1)
    with pytest.raises(InUseError, match="alias 'production'"):
        reg.delete("demo@1")
    with pytest.raises(InUseError):
        reg.delete("demo")  # demo@production
    reg.mark_deployed("demo", 2, slot="stable", app="rayloop")
    assert reg.deployments("demo") == [
        {"name": "demo", "version": 2, "app": "rayloop", "slot": "stable", "since": reg.deployments("demo")[0]["since"]}
    ]
    with pytest.raises(InUseError, match="deployment rayloop/stable"):
        reg.delete("demo@2")
    reg.mark_deployed("demo", 3, slot="stable", app="rayloop")  # the slot moved on
    reg.delete("demo@2")
    reg.unmark_deployed("demo", slot="stable", app="rayloop")
    reg.unmark_deployed("demo", slot="stable", app="rayloop")  # idempotent
    assert reg.deployments("demo") == []
    reg.delete("demo@3")
    assert not Path(reg.storage.path("models/demo/3")).exists()
    assert [v.version for v in reg.list_versions("demo")] == [1]


def test_gc_keeps_newest_and_protected(reg: Registry, model: Path) -> None:
    for _ in range(6):
        reg.register("demo", model)
    reg.set_alias("demo", "production", 1)
    reg.mark_deployed("demo", 2, slot="canary", app="rayloop")
    assert reg.gc("demo", keep=2, dry_run=True) == [3, 4]
    assert [v.version for v in reg.list_versions("demo")] == [1, 2, 3, 4, 5, 6]
    assert reg.gc("demo", keep=2) == [3, 4]
    assert [v.version for v in reg.list_versions("demo")] == [1, 2, 5, 6]
    assert not Path(reg.storage.path("models/demo/3")).exists()
    assert reg.gc("demo", keep=2) == []
    with pytest.raises(RegistryError, match="keep"):
        reg.gc("demo", keep=-1)


# -- rollouts ------------------------------------------------------------------
def test_rollout_lock_and_history(reg: Registry, model: Path) -> None:
    reg.register("demo", model)
    reg.register("demo", model)
    rid = reg.begin_rollout(
        "demo", from_version=1, to_version=2, strategy="canary", plan={"steps": [5, 100]}, owner="c1"
    )
    with pytest.raises(RolloutInProgressError, match=f"rollout {rid} of 'demo'"):
        reg.begin_rollout("demo", from_version=1, to_version=2, strategy="rolling", plan={}, owner="c2")
    with pytest.raises(InUseError, match=f"active rollout {rid}"):
        reg.delete("demo@2")
    reg.update_rollout(
        rid, status="step", state=RolloutState(phase="step", percent=5), event={"event": "step", "pct": 5}
    )
    active = reg.active_rollout("demo")
    assert active is not None
    assert (active.id, active.status, active.owner) == (rid, "step", "c1")
    assert active.state.to_json() == {"phase": "step", "percent": 5.0}
    assert [e["event"] for e in active.history] == ["begin", "step"]
    assert all("time" in e for e in active.history)
    with pytest.raises(RolloutError, match="end_rollout"):
        reg.update_rollout(rid, status="succeeded")
    with pytest.raises(RolloutError, match="not one of"):
        reg.end_rollout(rid, "done")
    reg.end_rollout(rid, "rolled_back")
    reg.end_rollout(rid, "rolled_back")  # idempotent
    with pytest.raises(RolloutError, match="already ended"):
        reg.update_rollout(rid, state=RolloutState())
    assert reg.active_rollout("demo") is None
    rid2 = reg.begin_rollout("demo", from_version=None, to_version=2, strategy="rolling", plan={}, owner="c2")
    assert [r.id for r in reg.rollouts("demo")] == [rid2, rid]
    assert reg.rollouts("demo")[1].status == "rolled_back"
    with pytest.raises(NotFoundError):
        reg.update_rollout(9999, state=RolloutState())


# -- plumbing ------------------------------------------------------------------
def test_from_settings_and_pickle(settings: Settings, model: Path) -> None:
    reg = Registry.from_settings(settings)
    assert reg.cache_dir == settings.home_path / "cache"
    assert reg.db.url == settings.registry_url
    reg.register("demo", model)
    copy = pickle.loads(pickle.dumps(reg))
    assert copy.resolve("demo@1").fingerprint == reg.resolve("demo@1").fingerprint
    assert copy.storage.uri == settings.storage_root


def test_verify_checks_stored_manifest(reg: Registry, model: Path) -> None:
    mv = reg.register("demo", model)
    p = _stored(reg, mv, "manifest.json")
    doc = json.loads(p.read_text())
    doc["files"]["config.json"]["size"] += 1
    p.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match=r"manifest\.json in storage disagrees") as ei:
        reg.verify("demo@1")
    assert ei.value.path == "manifest.json"
    p.unlink()
    with pytest.raises(IntegrityError, match=r"manifest\.json is missing"):
        reg.verify("demo@1")


def test_times_share_one_format(reg: Registry, model: Path) -> None:
    mv = reg.register("demo", model)
    reg.set_alias("demo", "production", 1)
    assert mv.to_json()["created_at"].endswith("Z")
    assert reg.alias_history("demo")[0]["time"].endswith("Z")


def test_registering_the_same_candidate_twice_gives_one_version(tmp_path: Path) -> None:
    """A pipeline resumed after registering (but before recording it) must not make a second version."""
    from rayloop.config import load_settings
    from rayloop.training.register import register_candidate
    from rayloop.training.retrain import RetrainResult

    settings = load_settings(env={"RAYLOOP_HOME": str(tmp_path / "home")})
    reg = Registry.from_settings(settings)
    reg.register("demo", make_model_dir(tmp_path / "base", seed=1))
    out = make_model_dir(tmp_path / "trained", seed=2)
    res = RetrainResult(model_dir=out, train_loss=0.1, eval_loss=None, steps=3, checkpoint_uri="file:///ckpt")
    first = register_candidate(settings, res, name="demo", parent_version=1, snapshot_id="snap-a")
    again = register_candidate(settings, res, name="demo", parent_version=1, snapshot_id="snap-a")
    assert first.version == again.version == 2
    assert [v.version for v in reg.list_versions("demo")] == [1, 2]
    assert reg.get_alias("demo", "candidate") == 2
    # Other data: a new candidate, even from the same files.
    other = register_candidate(settings, res, name="demo", parent_version=1, snapshot_id="snap-b")
    assert other.version == 3


def test_a_retrained_candidate_may_be_its_models_first_version(tmp_path: Path) -> None:
    from rayloop.config import load_settings
    from rayloop.training.register import register_candidate
    from rayloop.training.retrain import RetrainResult

    settings = load_settings(env={"RAYLOOP_HOME": str(tmp_path / "home")})
    out = make_model_dir(tmp_path / "trained", seed=2)
    res = RetrainResult(model_dir=out, train_loss=0.1, eval_loss=None, steps=3, checkpoint_uri="file:///ckpt")
    mv = register_candidate(settings, res, name="fresh", parent_version=None, snapshot_id="snap-a")
    assert mv.version == 1 and Registry.from_settings(settings).get_alias("fresh", "candidate") == 1


def test_a_node_without_the_drivers_model_directory_fetches_the_version_into_its_own_cache(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a training worker or an evaluation engine on another node does with the driver's directory."""
    from rayloop.config import load_settings
    from rayloop.registry.registry import model_dir_on_this_node

    settings = load_settings(
        env={"RAYLOOP_STORAGE": str(tmp_path / "storage"), "RAYLOOP_REGISTRY_URL": f"sqlite:///{tmp_path / 'r.db'}"}
    )
    mv = Registry.from_settings(settings).register("demo", model)
    # On the driver's node the directory is used as it is.
    assert model_dir_on_this_node(model, mv.ref, settings) == model
    # Elsewhere (here: a path this node does not have) the version comes from the registry, into the node's dir.
    monkeypatch.setenv("RAYLOOP_NODE_DIR", str(tmp_path / "node"))
    got = model_dir_on_this_node(tmp_path / "on-the-head" / "m0", mv.ref, settings.dump())
    assert got.parent == tmp_path / "node" / "cache" / "models"
    assert _sha(got / "model.safetensors") == _sha(model / "model.safetensors")
    # Without a registered version to fall back on, the error says which node lacks what, and what to do.
    with pytest.raises(RegistryError, match="is not on host") as e:
        model_dir_on_this_node(tmp_path / "on-the-head" / "m0", None, settings)
    assert "rayloop models register" in (e.value.hint or "")


def test_a_model_cache_the_node_cannot_write_is_an_error_naming_the_variable(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(str(tmp_path / "storage"), f"sqlite:///{tmp_path / 'reg.db'}", cache_dir=tmp_path / "ro" / "cache")
    mv = reg.register("demo", model)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "cache").write_text("not a directory")  # mkdir under it fails, as on a read-only path
    with pytest.raises(RegistryError, match="cannot use the model cache") as e:
        reg.fetch(mv.ref)
    assert "RAYLOOP_NODE_DIR" in (e.value.hint or "")
