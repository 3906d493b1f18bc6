"""Fast tests of the serving pieces: no Ray cluster, no vLLM (FakeEngine passed by constructor)."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from rayloop.config import Settings
from rayloop.data.capture import CaptureClient, CaptureWriter, read_feedback, read_interactions, utcnow
from rayloop.errors import ConfigError, IntegrityError, NotFoundError, UnsafeArtifactError
from rayloop.serving import checkpoint, golden
from rayloop.serving.app import ServeArgs
from rayloop.serving.auth import KeyChecker, hash_key, load_key_hashes
from rayloop.serving.protocol import ModelConfig, ReplyHead, ReplyTail, parse_ref
from rayloop.serving.server import LLMServer
from rayloop.storage import Storage

FAKE = "rayloop.serving.fake_engine:FakeEngine"


def _safetensors(
    path: Path, tensors: dict[str, list[int]], truncate: int = 0, metadata: dict[str, str] | None = None
) -> None:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    off = 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + bytes(off)
    path.write_bytes(data[: len(data) - truncate] if truncate else data)


def _model_dir(root: Path, *, seed: int = 0, tie: bool = False, hidden: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "tie_word_embeddings": tie, "seed": seed}
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "tokenizer.json").write_text('{"v": 1}')
    tensors = {"embed.weight": [8, hidden]}
    if not tie:
        tensors["lm_head.weight"] = [8, hidden]
    # Different seeds -> different bytes (the fake engine's answers depend on them), in a complete file.
    _safetensors(root / "model.safetensors", tensors, metadata={"seed": str(seed)})
    return root


# -- checkpoint -----------------------------------------------------------------
def test_check_model_dir_and_signatures(tmp_path: Path) -> None:
    a = checkpoint.check_model_dir(_model_dir(tmp_path / "a", seed=1))
    b = checkpoint.check_model_dir(_model_dir(tmp_path / "b", seed=2))
    assert a.differences(b) == []  # same shapes, other weights: in-place swap allowed
    tied = checkpoint.check_model_dir(_model_dir(tmp_path / "t", tie=True))
    assert any("tensor set" in d for d in a.differences(tied))
    wide = checkpoint.check_model_dir(_model_dir(tmp_path / "w", hidden=8))
    assert any("config" in d for d in a.differences(wide))
    # Tokenizer config: where it was loaded from (written by save_pretrained) does not matter, content does.
    (tmp_path / "a" / "tokenizer_config.json").write_text('{"model_max_length": 256, "pad_token": "<pad>"}')
    (tmp_path / "b" / "tokenizer_config.json").write_text(
        '{"pad_token": "<pad>", "is_local": true, "local_files_only": false, "model_max_length": 256}'
    )
    a, b = checkpoint.check_model_dir(tmp_path / "a"), checkpoint.check_model_dir(tmp_path / "b")
    assert a.differences(b) == []
    (tmp_path / "b" / "tokenizer_config.json").write_text('{"model_max_length": 256, "pad_token": "<unk>"}')
    assert checkpoint.check_model_dir(tmp_path / "b").differences(a) == ["tokenizer files differ"]


def test_check_model_dir_refuses_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        checkpoint.check_model_dir(tmp_path / "missing")
    d = _model_dir(tmp_path / "trunc")
    _safetensors(d / "model.safetensors", {"embed.weight": [8, 4]}, truncate=10)
    with pytest.raises(IntegrityError, match="truncated"):
        checkpoint.check_model_dir(d)
    p = _model_dir(tmp_path / "pickle")
    (p / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsafeArtifactError):
        checkpoint.check_model_dir(p)
    s = _model_dir(tmp_path / "shards")
    (s / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(IntegrityError, match="lacks shards"):
        checkpoint.check_model_dir(s)
    ok = _model_dir(tmp_path / "fp")
    with pytest.raises(IntegrityError, match="fingerprint"):
        checkpoint.check_model_dir(ok, expected_fingerprint="0" * 64)
    checkpoint.check_model_dir(ok, expected_fingerprint=checkpoint.fingerprint(ok))


def test_fingerprint_matches_the_registry_definition(tmp_path: Path) -> None:
    from rayloop.registry.artifacts import fingerprint as registry_fingerprint

    d = _model_dir(tmp_path / "m")
    (d / ".hidden").write_text("ignored")
    assert checkpoint.fingerprint(d) == registry_fingerprint(checkpoint.manifest(d))  # type: ignore[arg-type]


# -- protocol, args, auth -------------------------------------------------------
def test_model_config_and_refs() -> None:
    assert parse_ref("demo@3") == ("demo", "3") and parse_ref("demo") == ("demo", None)
    with pytest.raises(ConfigError):
        parse_ref("bad name@")
    cfg = ModelConfig(model="demo", version=2)
    assert cfg.served_id == "demo@v2"
    with pytest.raises(ValueError, match="fingerprint"):
        ModelConfig(model="demo", version=1, fingerprint="abc")
    with pytest.raises(ValueError):
        ModelConfig(model="demo", version=0)


def test_serve_args_validate_the_settings_model() -> None:
    a = ServeArgs.model_validate({"model": "demo", "settings": {"serving": {"replicas": 2}}})
    assert a.name == "demo" and a.settings.serving.replicas == 2
    with pytest.raises(ValueError, match="replicaz"):
        ServeArgs.model_validate({"model": "demo", "settings": {"serving": {"replicaz": 2}}})


def test_api_keys(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\nkey-b\n\n")
    s = Settings.model_validate({"serving": {"api_keys_file": str(f)}})
    hashes = load_key_hashes(s.serving, env={"RAYLOOP_API_KEYS": "key-a, "})
    assert hashes == {hash_key("key-a"), hash_key("key-b")}
    kc = KeyChecker(hashes)
    assert kc.allows("Bearer key-a") and kc.allows("bearer key-b")
    assert not kc.allows(None) and not kc.allows("Bearer nope") and not kc.allows("key-a")
    assert KeyChecker(set()).allows(None)
    with pytest.raises(ConfigError, match="api_keys_file"):
        load_key_hashes(Settings.model_validate({"serving": {"api_keys_file": str(tmp_path / "none")}}).serving, env={})


# -- LLMServer with the fake engine ---------------------------------------------------
async def _drain(gen: Any) -> list[Any]:
    return [x async for x in gen]


def test_llm_server_versions_in_place_rebuild_and_validation(tmp_path: Path) -> None:
    settings = Settings.model_validate({"home": str(tmp_path / "home")})
    v1 = _model_dir(tmp_path / "v1", seed=1)
    v2 = _model_dir(tmp_path / "v2", seed=2)
    tied = _model_dir(tmp_path / "t", seed=3, tie=True)

    async def run() -> None:
        srv = LLMServer(settings.dump(), "stable", engine_cls=FAKE)
        (head,) = await _drain(srv.chat({"messages": [{"role": "user", "content": "hi"}]}, "r0"))
        assert head.status == 503  # nothing loaded yet

        await srv.reconfigure({"model": "demo", "version": 1, "path": str(v1)})
        assert srv.last_swap is not None and srv.last_swap.mode == "fresh" and srv.last_swap.golden_ok
        items = await _drain(
            srv.chat({"model": "demo", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 5}, "r1")
        )
        (head,) = items
        assert isinstance(head, ReplyHead) and head.status == 200 and head.version == 1
        assert head.body is not None and head.body["model"] == "demo@v1"
        assert head.tail is not None and head.tail.completion_tokens == 3 and head.tail.text.endswith("b a")
        first_answer = head.tail.text

        # No golden record for v2 yet: an in-place swap cannot be verified, so the engine is rebuilt.
        await srv.reconfigure({"model": "demo", "version": 2, "path": str(v2)})
        assert srv.last_swap.mode == "rebuild" and "no golden answers" in srv.last_swap.reason

        # Back to v1 (recorded): same shapes, golden record present -> in place, verified.
        await srv.reconfigure({"model": "demo", "version": 1, "path": str(v1)})
        assert srv.last_swap.mode == "in_place" and srv.last_swap.golden_ok is True
        assert srv._engine.reloads == 1  # type: ignore[union-attr]
        items = await _drain(
            srv.chat({"messages": [{"role": "user", "content": "a b"}], "max_tokens": 5, "stream": True}, "r2")
        )
        head, *chunks, tail = items
        assert head.streaming and head.version == 1 and isinstance(tail, ReplyTail)
        assert "".join(chunks).rstrip().endswith("data: [DONE]") and tail.text == first_answer

        # Other tensor set -> rebuild.
        await srv.reconfigure({"model": "demo", "version": 3, "path": str(tied)})
        assert srv.last_swap.mode == "rebuild" and "tensor set" in srv.last_swap.reason

        # A bad checkpoint is refused before the engine is touched; the replica keeps serving v3.
        with pytest.raises(IntegrityError):
            await srv.reconfigure({"model": "demo", "version": 4, "path": str(v2), "fingerprint": "0" * 64})
        info = await srv.info()
        assert info["version"] == 3
        (head,) = await _drain(srv.completion({"prompt": "x y", "max_tokens": 0}, "r3"))
        assert head.status == 400 and head.body["error"]["param"] == "max_tokens"
        await srv.check_health()

    asyncio.run(run())


def test_parked_slot_keeps_its_engine_and_takes_the_next_version_in_place(tmp_path: Path) -> None:
    """rollout.keep_warm_slots: parking keeps the engine; the next version is a swap, not a new engine."""
    settings = Settings.model_validate({"home": str(tmp_path / "home")})
    v1 = _model_dir(tmp_path / "v1", seed=1)
    v2 = _model_dir(tmp_path / "v2", seed=2)

    async def run() -> None:
        srv = LLMServer(settings.dump(), "canary", engine_cls=FAKE)
        await srv.reconfigure({"model": "demo", "version": 2, "path": str(v2)})  # records v2's golden answers
        await srv.reconfigure({"model": "demo", "version": 1, "path": str(v1)})
        engine = srv._engine
        swaps = srv.last_swap

        await srv.reconfigure({"model": "demo", "version": 1, "path": str(v1), "parked": True})
        info = await srv.info()
        assert info["parked"] is True and info["version"] == 1
        assert srv._engine is engine and srv.last_swap is swaps  # nothing reloaded, nothing rebuilt

        await srv.reconfigure({"model": "demo", "version": 1, "path": str(v1)})  # active again, same version
        assert (await srv.info())["parked"] is False and srv._engine is engine and srv.last_swap is swaps

        await srv.reconfigure({"model": "demo", "version": 1, "path": str(v1), "parked": True})
        await srv.reconfigure({"model": "demo", "version": 2, "path": str(v2)})  # the next rollout's version
        info = await srv.info()
        assert info["parked"] is False and info["version"] == 2
        assert srv._engine is engine and srv.last_swap.mode == "in_place" and srv.last_swap.golden_ok

    asyncio.run(run())


def test_golden_mismatch_restores_the_old_weights_then_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings.model_validate({"home": str(tmp_path / "home")})
    v1 = _model_dir(tmp_path / "v1", seed=1)
    v2 = _model_dir(tmp_path / "v2", seed=2)
    storage = Storage(settings.storage_root)
    es = settings.serving.engine
    # A wrong record for v2, as if the in-place engine answered differently from a fresh one.
    fp2 = checkpoint.fingerprint(v2)
    golden.save_golden(storage, golden.GoldenRecord(fp2, golden.engine_key(es), list(golden.PROMPTS), ["x"] * 4), es)

    from rayloop.serving import fake_engine

    during_rebuild: dict[str, Any] = {}
    start = fake_engine.FakeEngine.start

    async def spy(self: Any, model_dir: str, *args: Any) -> None:
        old = srv._engine
        if old is not None and old is not self:  # the rebuild's engine starts while the old one answers
            during_rebuild.update(salt=old._salt, version=srv._loaded.cfg.version, names=list(old._names))
        await start(self, model_dir, *args)

    monkeypatch.setattr(fake_engine.FakeEngine, "start", spy)

    async def run() -> None:
        await srv.reconfigure({"model": "demo", "version": 1, "path": str(v1)})
        await srv.reconfigure({"model": "demo", "version": 2, "path": str(v2)})
        assert srv.last_swap is not None and srv.last_swap.mode == "rebuild"
        assert "golden prompts" in srv.last_swap.reason and srv.last_swap.golden_ok is False

    srv = LLMServer(settings.dump(), "stable", engine_cls=FAKE)
    asyncio.run(run())
    # While v2's engine was built, the old one answered with v1's weights again, stamped v1.
    assert during_rebuild == {"salt": fake_engine._weights_salt(str(v1)), "version": 1, "names": ["demo@v1", "demo"]}


# -- capture ---------------------------------------------------------------------
def _row(rid: str, version: int = 1) -> dict[str, Any]:
    return {
        "request_id": rid,
        "timestamp": utcnow(),
        "model_name": "demo",
        "model_version": version,
        "endpoint": "chat",
        "status": "ok",
        "completion": "c",
    }


def test_capture_writer_batches_partitions_and_bounds(tmp_path: Path) -> None:
    async def run() -> None:
        w = CaptureWriter(str(tmp_path), None, batch_rows=3, flush_s=60, max_buffer=5)
        assert await w.append("interactions", [_row("a"), _row("b"), _row("c", 2)]) == 0
        assert await w.append("interactions", [_row("d")]) == 0  # 3 rows of v1 -> one file written
        assert len(list(Storage(str(tmp_path)).list("interactions"))) == 1
        # 1 row (c) is buffered; the buffer holds 5, so 4 of 10 new rows fit and 6 are dropped.
        assert await w.append("interactions", [_row(str(i)) for i in range(10)]) == 6
        assert (await w.stats())["dropped"]["interactions"] == 6
        await w.flush()
        assert await w.lookup("c") == {"model_name": "demo", "model_version": 2}
        await w.append(
            "feedback",
            [{"request_id": "a", "timestamp": utcnow(), "rating": 1, "model_name": "demo", "model_version": 1}],
        )
        await w.flush()
        # A new writer (restart) finds old ids on disk.
        w2 = CaptureWriter(str(tmp_path), None, batch_rows=3, flush_s=60, max_buffer=5)
        assert await w2.lookup("a") == {"model_name": "demo", "model_version": 1}
        assert await w2.lookup("nope") is None

    asyncio.run(run())
    tbl = read_interactions(str(tmp_path))
    assert tbl.num_rows == 8
    assert set(tbl.column("version").to_pylist()) == {1, 2}
    assert read_interactions(str(tmp_path), version=2).num_rows == 1
    assert read_feedback(str(tmp_path)).num_rows == 1
    assert not [k for k in Storage(str(tmp_path)).list("") if "/.tmp-" in k]


class _FakeWriterHandle:
    """Stands in for the actor handle: ``writer.method.remote(...)`` returns an awaitable."""

    def __init__(self, writer: CaptureWriter) -> None:
        self.w = writer

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.w, name)

        class _M:
            @staticmethod
            def remote(*a: Any) -> Any:
                return method(*a)

        return _M


def test_capture_client_never_blocks_and_flushes_on_close(tmp_path: Path) -> None:
    drops: list[int] = []

    async def run() -> None:
        w = CaptureWriter(str(tmp_path), None, batch_rows=100, flush_s=60, max_buffer=1000)
        c = CaptureClient(
            _FakeWriterHandle(w), batch_rows=100, flush_s=60, max_buffer=4, on_drop=lambda t, n: drops.append(n)
        )
        results = [c.record("interactions", _row(str(i))) for i in range(6)]
        assert results == [True] * 4 + [False] * 2 and c.dropped == 2 and sum(drops) == 2
        assert await c.lookup("3") == {"model_name": "demo", "model_version": 1}  # still queued locally
        await c.close()

    asyncio.run(run())
    assert read_interactions(str(tmp_path)).num_rows == 4


def test_capture_client_finds_rows_while_they_are_being_shipped(tmp_path: Path) -> None:
    # Feedback can arrive while the interaction row is on its way to the writer
    # (taken off the queue, not yet acknowledged): it must not get a 404.
    async def run() -> None:
        w = CaptureWriter(str(tmp_path), None, batch_rows=100, flush_s=60, max_buffer=1000)
        gate = asyncio.Event()

        class SlowAppend(_FakeWriterHandle):
            def __getattr__(self, name: str) -> Any:
                if name != "append":
                    return super().__getattr__(name)

                class _M:
                    @staticmethod
                    async def remote(*a: Any) -> Any:
                        await gate.wait()
                        return await w.append(*a)

                return _M

        c = CaptureClient(SlowAppend(w), batch_rows=100, flush_s=60, max_buffer=10)
        c.record("interactions", _row("x1"))
        ship = asyncio.create_task(c._ship())
        await asyncio.sleep(0)  # the row is now in flight
        assert not c._pending
        assert await c.lookup("x1") == {"model_name": "demo", "model_version": 1}
        gate.set()
        await ship
        assert await c.lookup("x1") == {"model_name": "demo", "model_version": 1}  # now from the writer
        await c.close()

    asyncio.run(run())


def test_rayloop_serve_cli_rejects_bad_arguments(rayloop_home: Path) -> None:
    from click.testing import CliRunner

    from rayloop.cli import cli

    r = CliRunner().invoke(cli, ["serve", "--model", "demo", "--version", "2"])
    assert r.exit_code == 1 and "--version only goes with --path" in r.output
    r = CliRunner().invoke(cli, ["serve", "--model", "bad name"])
    assert r.exit_code == 1 and "NAME@REF" in r.output


def test_rayloop_serve_leaves_a_foreign_app_alone(settings: Any) -> None:
    from rayloop.errors import ServingError
    from rayloop.serving import deploy as deploy_mod
    from rayloop.serving.control import InMemoryControl
    from rayloop.serving.protocol import ModelConfig

    foreign = {"name": settings.serving.app_name, "import_path": "someone.else:app", "deployments": []}
    running = InMemoryControl([foreign])
    with pytest.raises(ServingError) as e:
        deploy_mod.deploy(settings, ModelConfig(model="demo", version=3, path="/nowhere"), control=running)
    assert "is not a rayloop serving app" in e.value.message and "--app" in (e.value.hint or "")
    assert running.deployed == [foreign] and running.applied == 0


def test_cpu_engine_env_runs_single_shard_engines_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from rayloop.config import EngineSettings
    from rayloop.serving.cpu_env import cpu_engine_env, cpu_engine_env_applied

    one = cpu_engine_env(EngineSettings(kv_cache_gib=2, cpu_threads=2))
    assert one == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2"}
    two = cpu_engine_env(EngineSettings(tensor_parallel_size=2, cpu_threads_bind="0|1"))
    assert two["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1" and two["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert "OMP_NUM_THREADS" not in two
    assert cpu_engine_env(EngineSettings(accelerator="gpu")) == {}

    # Applied only while the engine is built; the caller's environment comes back as it was.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with cpu_engine_env_applied(EngineSettings(kv_cache_gib=4)):
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        assert os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"  # an explicit size wins
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    assert os.environ["OMP_NUM_THREADS"] == "7"


async def _timed(gen: Any) -> list[tuple[float, str]]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    return [(loop.time() - t0, msg) async for msg in gen]


def test_stream_coalescing_holds_messages_to_the_interval_but_not_the_first_or_last() -> None:
    from rayloop.serving.server import _coalesce

    async def tokens(n: int, every_s: float) -> Any:
        for i in range(n):
            yield f"data: {i}\n\n"
            await asyncio.sleep(every_s)

    async def collect(interval_s: float) -> list[tuple[float, str]]:
        return await _timed(_coalesce(tokens(40, 0.005), lambda: interval_s))

    async def collect_fn(interval: Any) -> list[tuple[float, str]]:
        return await _timed(_coalesce(tokens(40, 0.005), interval))

    held = asyncio.run(collect(0.05))
    every = asyncio.run(collect(0.0))
    expected = "".join(f"data: {i}\n\n" for i in range(40))
    assert "".join(m for _, m in held) == expected == "".join(m for _, m in every)  # nothing lost or reordered
    assert held[0][1] == "data: 0\n\n"  # the first token goes out at once, alone
    # ~0.2 s of tokens: several messages, each (but the last, the end of the stream) >= 50 ms after the previous.
    assert len(held) >= 3
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(held)]
    assert min(gaps[:-1]) >= 0.045, gaps
    # The end of a stream is not held back by the interval.
    t0 = time.monotonic()
    assert [m for _, m in asyncio.run(_timed(_coalesce(tokens(3, 0.005), lambda: 10.0)))] == [
        "data: 0\n\n",
        "data: 1\n\ndata: 2\n\n",
    ]
    assert time.monotonic() - t0 < 5.0

    # The interval is asked after every message (the replica's grows with its streams).
    asked: list[int] = []

    def grows() -> float:
        asked.append(1)
        return 0.02 * len(asked)

    varying = asyncio.run(collect_fn(grows))
    assert "".join(m for _, m in varying) == expected and len(asked) == len(varying)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(varying)]
    assert all(g >= 0.02 * (i + 1) - 0.005 for i, g in enumerate(gaps[:-1])), gaps

    async def failing() -> Any:
        yield "data: 0\n\n"
        raise RuntimeError("engine died")

    async def drain() -> list[str]:
        return [m async for m in _coalesce(failing(), lambda: 0.05)]

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(drain())


def test_replica_stream_interval_grows_with_its_streams(tmp_path: Path) -> None:
    def interval(streams: int, **serving: Any) -> float:
        settings = Settings.model_validate({"home": str(tmp_path / "home"), "serving": serving})
        srv = LLMServer(settings.dump(), "stable", engine_cls=FAKE)
        srv._streams = streams
        return srv._stream_interval()

    assert interval(1) == 0.1  # the floor (defaults: 100 ms, 100 messages/s)
    assert interval(8) == 0.1
    assert interval(32) == pytest.approx(0.32)  # 32 streams share 100 messages/s
    assert interval(32, stream_messages_per_s=0) == 0.1  # no budget: the floor only
    assert interval(32, stream_interval_ms=0, stream_messages_per_s=0) == 0.0  # per engine step


class _RecordingHandle:
    """Stands in for a DeploymentHandle: records the options it was given."""

    def __init__(self, opts: dict[str, Any] | None = None) -> None:
        self.opts = opts or {}

    def options(self, **kw: Any) -> _RecordingHandle:
        return _RecordingHandle({**self.opts, **kw})


@pytest.mark.parametrize("grpc", [True, False])
def test_ingress_calls_engine_slots_over_grpc_unless_turned_off(grpc: bool) -> None:
    from types import SimpleNamespace

    from rayloop.serving.ingress import OpenAIIngress

    settings = Settings.model_validate({"serving": {"grpc_handles": grpc}})
    assert Settings().serving.grpc_handles  # the default
    ing = SimpleNamespace(slots={"stable": _RecordingHandle()}, settings=settings)
    got = OpenAIIngress.slot_handle(ing, "stable", stream=True).opts  # type: ignore[arg-type]
    assert got["stream"] is True
    # _by_reference=False is Serve's switch from Ray actor calls to its inter-deployment gRPC.
    assert got.get("_by_reference", True) is (not grpc)
    assert OpenAIIngress.slot_handle(ing, "stable").opts["stream"] is False  # type: ignore[arg-type]


async def _replies(*items: Any, log: list[str]) -> Any:
    try:
        for item in items:
            yield item
    finally:
        log.append("closed")


def test_engine_ingress_admits_up_to_its_limit_and_counts_each_answer_while_it_runs() -> None:
    import asyncio
    from types import SimpleNamespace

    from ray.serve.exceptions import BackPressureError

    from rayloop.serving.engine_ingress import EngineIngress
    from rayloop.serving.protocol import ReplyHead, ReplyTail

    rep = SimpleNamespace(in_flight=0, admit_limit=2)

    async def scenario() -> None:
        log: list[str] = []
        streamed = EngineIngress._admit(
            rep, _replies(ReplyHead(200, "m", 1, streaming=True), "data: a\n\n", ReplyTail(), log=log)
        )
        assert isinstance(await streamed.__anext__(), ReplyHead)
        assert rep.in_flight == 1  # a stream counts until its end
        whole = EngineIngress._admit(rep, _replies(ReplyHead(200, "m", 1, body={"x": 1}), log=log))
        assert (await whole.__anext__()).body == {"x": 1}
        assert rep.in_flight == 1  # the whole answer was in the head: no longer counted
        third = EngineIngress._admit(rep, _replies(ReplyHead(200, "m", 1, streaming=True), log=log))
        await third.__anext__()
        assert rep.in_flight == 2
        refused = _replies(ReplyHead(200, "m", 1), log=log)
        over = EngineIngress._admit(rep, refused)
        with pytest.raises(BackPressureError):
            await over.__anext__()
        assert rep.in_flight == 2 and refused.ag_frame is None  # refused: its engine generator is closed
        await third.aclose()  # a client that disconnects mid-stream
        assert rep.in_flight == 1
        assert [item async for item in streamed][-1] == ReplyTail()
        assert rep.in_flight == 0
        await whole.aclose()
        assert rep.in_flight == 0 and log.count("closed") == 3  # every started engine generator was closed

    asyncio.run(scenario())


def test_row_status_keeps_client_errors_apart_from_the_versions_own() -> None:
    from rayloop.serving.ingress import CLIENT_DISCONNECTED, row_status
    from rayloop.serving.protocol import ReplyTail
    from rayloop.serving.stats import StatsClient

    assert row_status(200, ReplyTail()) == "ok"
    assert row_status(400, ReplyTail(error="max_tokens must be at least 1")) == "client_error"
    assert row_status(200, ReplyTail(error=CLIENT_DISCONNECTED)) == "client_error"
    # A stream that started with 200 and then carried an engine error is the version's fault.
    assert row_status(200, ReplyTail(error="EngineDeadError: engine core died")) == "error"
    assert row_status(500, ReplyTail(error="boom")) == "error"

    stats = StatsClient(lambda: None)
    for i, status in enumerate(["ok", "client_error", "error", "client_error"]):
        stats.observe("canary", {"request_id": f"r{i}", "model_version": 2, "status": status, "latency_ms": 5.0})
    assert [(o[1], o[4]) for o in stats._obs] == [("r0", True), ("r2", False)]


def test_a_registry_password_never_travels_in_serve_args(tmp_path: Path) -> None:
    """Serve shows an app's args in the dashboard: the password moves to storage; replicas read it from there."""
    import json as _json

    from rayloop.config import load_settings
    from rayloop.registry.registry import PASSWORD_KEY, database_url
    from rayloop.serving.app import ServeArgs

    url = "postgresql://rayloop:s3cr%2Ft@db.internal:5432/rayloop"
    s = load_settings(env={"RAYLOOP_HOME": str(tmp_path)}, overrides={"registry": {"url": url}})
    args = ServeArgs(model="demo", settings=s)
    dumped = _json.dumps(args.model_dump(mode="json"))
    assert "s3cr" not in dumped and args.settings.registry.url == "postgresql://rayloop@db.internal:5432/rayloop"
    secret = tmp_path / "storage" / PASSWORD_KEY
    assert secret.read_text() == "s3cr/t" and (secret.stat().st_mode & 0o777) == 0o600
    # What a replica builds from the args it was given reaches the database with the password.
    replica = ServeArgs.model_validate(_json.loads(dumped))
    assert database_url(replica.settings) == "postgresql://rayloop:s3cr%2Ft@db.internal:5432/rayloop"
    assert ServeArgs(model="demo", settings=s).model_dump() == args.model_dump()  # the same args each time


def test_autoscaling_replaces_fixed_replicas_on_active_slots_only(tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from rayloop.config import settings_from_dict
    from rayloop.serving.app import AppState, app_config, slot_deployment_name
    from rayloop.serving.routing import CANARY, SHADOW, STABLE, RouteTable

    scaled = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    s = settings_from_dict({"home": str(tmp_path), "serving": {"replicas": 2, "autoscaling": scaled}})
    assert s.serving.max_replicas == 3
    v1 = ModelConfig(model="demo", version=1, fingerprint="a" * 64)
    v2 = ModelConfig(model="demo", version=2, fingerprint="b" * 64)
    state = AppState(model="demo", slots={STABLE: v1, CANARY: v2, SHADOW: None}, table=RouteTable(canary_percent=25))
    app = app_config(s, ServeArgs(model="demo", settings=s), state)
    deps = {d["name"]: d for d in app["deployments"]}
    for slot in (STABLE, CANARY):  # the active slots scale with their load, from min_replicas up
        d = deps[slot_deployment_name(slot)]
        assert "num_replicas" not in d
        assert d["autoscaling_config"]["min_replicas"] == 1 and d["autoscaling_config"]["max_replicas"] == 3
        assert d["autoscaling_config"]["target_ongoing_requests"] == 4
    idle = deps[slot_deployment_name(SHADOW)]
    assert idle["num_replicas"] == 1 and "autoscaling_config" not in idle
    ServeDeploySchema.model_validate({"applications": [app]})  # Serve accepts it as written

    fixed = app_config(
        s.model_copy(update={"serving": s.serving.model_copy(update={"autoscaling": None})}),
        ServeArgs(model="demo", settings=s),
        state,
    )
    assert {d["name"]: d.get("num_replicas") for d in fixed["deployments"]}[slot_deployment_name(STABLE)] == 2

    with pytest.raises(ConfigError, match=r"max_replicas \(1\) is below min_replicas \(2\)"):
        settings_from_dict({"home": str(tmp_path), "serving": {"autoscaling": {"min_replicas": 2, "max_replicas": 1}}})


def test_tensor_parallel_shards_reserve_the_configured_accelerator_on_one_node(tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from rayloop.config import settings_from_dict
    from rayloop.serving.app import AppState, app_config, slot_deployment_name
    from rayloop.serving.routing import STABLE, RouteTable

    v1 = ModelConfig(model="demo", version=1, fingerprint="a" * 64)
    state = AppState(model="demo", slots={STABLE: v1}, table=RouteTable())
    for resource in ("GPU", "accel"):
        engine = {"accelerator": "gpu", "tensor_parallel_size": 2, "accelerator_resource": resource}
        s = settings_from_dict({"home": str(tmp_path), "serving": {"replica_num_cpus": 1, "engine": engine}})
        app = app_config(s, ServeArgs(model="demo", settings=s), state)
        stable = {d["name"]: d for d in app["deployments"]}[slot_deployment_name(STABLE)]
        assert stable["placement_group_bundles"] == [{"CPU": 1}, {resource: 1}, {resource: 1}]
        assert stable["placement_group_strategy"] == "STRICT_PACK"
        ServeDeploySchema.model_validate({"applications": [app]})
    cpu = settings_from_dict({"home": str(tmp_path), "serving": {"engine": {"tensor_parallel_size": 2}}})
    app = app_config(cpu, ServeArgs(model="demo", settings=cpu), state)
    assert all("placement_group_bundles" not in d for d in app["deployments"])  # vLLM on CPU: no accelerators


def test_rayloop_serve_names_the_settings_that_differ_from_the_running_apps(settings: Any) -> None:
    """Settings changed in rayloop.yaml after `rayloop serve` would restart every replica: serve refuses, and
    says which ones changed (never their values: API keys are hashes of secrets)."""
    from rayloop.config import load_settings
    from rayloop.errors import ServingError
    from rayloop.serving import deploy as deploy_mod
    from rayloop.serving.app import AppState, ServeArgs, app_config
    from rayloop.serving.control import InMemoryControl
    from rayloop.serving.protocol import ModelConfig

    v1 = ModelConfig(model="demo", version=1, path="/m1")
    running = app_config(
        settings, ServeArgs(model="demo", settings=settings), AppState(model="demo", slots={"stable": v1})
    )
    control = InMemoryControl([running])
    edited = load_settings(
        env={"RAYLOOP_HOME": settings.home},
        overrides={"serving": {"replicas": settings.serving.replicas + 1}, "ray": {"gcs_storage_path": "gcs"}},
    )
    with pytest.raises(ServingError) as e:
        deploy_mod.deploy(
            edited, ModelConfig(model="demo", version=2, path="/m2"), control=control, api_key_hashes=["ab" * 32]
        )
    msg = e.value.message
    assert "(the API keys, ray.gcs_storage_path, serving.replicas differ)" in msg, msg
    assert "ab" * 32 not in msg and "serve delete rayloop" in (e.value.hint or "")
    assert control.deployed == [running] and control.applied == 0
    # The same settings upgrade in place (nothing to name).
    assert deploy_mod.args_changed({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == ["a.c", "d"]


def test_canary_and_shadow_slots_start_and_stop_all_their_replicas_at_once(tmp_path: Path) -> None:
    """A canary or shadow slot serves nobody while it changes, so Serve replaces all its replicas in one wave;
    the stable slot keeps Serve's rolling update (a fifth of its replicas at a time: in-place swaps keep the
    rest serving)."""
    from ray.serve.schema import ServeDeploySchema

    from rayloop.config import settings_from_dict
    from rayloop.serving.app import AppState, app_config, build_app, slot_deployment_name
    from rayloop.serving.routing import CANARY, SHADOW, STABLE

    s = settings_from_dict({"home": str(tmp_path), "serving": {"replicas": 2}})
    stable = build_app(ServeArgs(model="demo", settings=s))._bound_deployment
    slots = {k: h._bound_deployment for k, h in stable.init_args[-1].items()}
    assert sorted(slots) == [CANARY, SHADOW]
    for slot, dep in slots.items():
        assert dep.name == slot_deployment_name(slot)
        assert dep._deployment_config.rolling_update_percentage == 1.0
    assert stable._deployment_config.rolling_update_percentage == 0.2  # Serve's default
    # The configs rayloop applies leave it to the app's code (Serve keeps what a config does not set).
    v1 = ModelConfig(model="demo", version=1, fingerprint="a" * 64)
    v2 = ModelConfig(model="demo", version=2, fingerprint="b" * 64)
    app = app_config(s, ServeArgs(model="demo", settings=s), AppState(model="demo", slots={STABLE: v1, CANARY: v2}))
    assert all("rolling_update_percentage" not in d for d in app["deployments"])
    ServeDeploySchema.model_validate({"applications": [app]})
