"""Ray Train + DeepSpeed retraining on a snapshot built from simulated traffic with corrective feedback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rayloop.config import Settings, load_settings
from rayloop.data.preprocess import SnapshotInfo, preprocess
from rayloop.data.replay import ReplaySource
from rayloop.data.snapshot import storage_of
from rayloop.demo.model import greedy_answers
from rayloop.demo.synthetic import write_interactions
from rayloop.demo.world import World
from rayloop.errors import TrainingError
from rayloop.training.retrain import RetrainResult, retrain


def accuracy(model_dir: Path, world: World, split: str) -> float:
    qs = world.eval_questions(split)  # type: ignore[arg-type]
    answers = greedy_answers(model_dir, [q.prompt for q in qs])
    return sum(world.is_correct(q, a) for q, a in zip(qs, answers, strict=True)) / len(qs)


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, ray_cluster: object) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("train-home")
    settings = load_settings(env={"RAYLOOP_HOME": str(home)})
    world = World.from_json((base_model_dir / "world.json").read_text())
    # Users ask every new-fact question a few times (training phrasings) and correct wrong answers.
    write_interactions(storage_of(settings), world, n=500, covering=True)
    info = preprocess(settings, model_dir=base_model_dir, replay=ReplaySource.from_model_dir(base_model_dir))
    return {"settings": settings, "world": world, "info": info}


def test_retrain_zero2_beats_parent_and_registers(snap: dict[str, Any], base_model_dir: Path, tmp_path: Path) -> None:
    settings: Settings = snap["settings"]
    info: SnapshotInfo = snap["info"]
    t0 = time.monotonic()
    res = retrain(
        settings,
        snapshot_id=info.snapshot_id,
        base_dir=base_model_dir,
        output_dir=tmp_path / "cand",
        workers=2,
        zero_stage=2,
    )
    took = time.monotonic() - t0
    assert res.steps == res.config["total_steps"]
    assert res.eval_loss is not None and res.metrics["base_eval_loss"] is not None
    assert res.eval_loss < res.metrics["base_eval_loss"]  # better than its parent on the snapshot's eval split
    world = snap["world"]
    new, known = accuracy(res.model_dir, world, "new"), accuracy(res.model_dir, world, "known")
    print(f"retrain {took:.0f}s: held-out new-fact accuracy {new:.2f}, known {known:.2f}, metrics {res.metrics}")
    assert accuracy(base_model_dir, world, "new") == 0.0
    assert new >= 0.8
    assert known >= 0.85
    assert (res.model_dir / "model.safetensors").is_file()
    assert not list(res.model_dir.glob("*.bin")) and not list(res.model_dir.glob("*.pt"))
    assert (res.model_dir / "tokenizer.json").is_file()
    # Resolved config next to the checkpoint.
    ckpt = Path(res.checkpoint_uri)
    assert (ckpt / "training_config.json").is_file()

    from rayloop.registry import Registry
    from rayloop.training.register import register_candidate

    reg = Registry.from_settings(settings)
    parent = reg.register("demo", base_model_dir)
    mv = register_candidate(settings, res, name="demo", parent_version=parent.version, snapshot_id=info.snapshot_id)
    assert reg.resolve("demo@candidate").version == mv.version == parent.version + 1
    got = reg.resolve(f"demo@{mv.version}")
    dumped = got.model_dump()
    assert info.snapshot_id in str(dumped) and "code_version" in str(dumped)


def _worker_pids() -> list[int]:
    """PIDs of the Ray Train workers of this test session's cluster (the state API needs the dashboard,
    which the session cluster runs without): processes under our raylet titled ``ray::RayTrainWorker``."""
    import psutil
    import ray._private.worker as ray_worker

    node = ray_worker._global_node
    assert node is not None, "the test session's Ray cluster is not running"
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    pids = []
    for p in raylet.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def test_a_worker_group_that_finds_no_room_fails_instead_of_waiting(
    snap: dict[str, Any], base_model_dir: Path, tmp_path: Path
) -> None:
    """Workers that cannot be placed (here: more CPUs each than the node has; on a cluster: a node died and
    nothing replaced it) end the run with an error naming the settings, after a bounded number of tries."""
    settings: Settings = snap["settings"].model_copy(deep=True)
    settings.training.worker_num_cpus = 64
    settings.training.start_timeout_s = 3
    settings.training.max_start_failures = 1
    with pytest.raises(
        TrainingError, match=r"found no room on the cluster within training.start_timeout_s \(3s\), 2 times"
    ):
        retrain(settings, snapshot_id=snap["info"].snapshot_id, base_dir=base_model_dir, output_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_zero3_worker_kill_resumes_and_export_loads_in_vllm(
    snap: dict[str, Any], base_model_dir: Path, tmp_path: Path
) -> None:
    # ZeRO-3 is the hard case for both: every rank holds only its shard of the parameters, so a resume
    # must restore all shards and the export must gather them into one consolidated model.
    settings: Settings = snap["settings"].model_copy(deep=True)
    settings.training.checkpoint_every = 4
    settings.training.epochs = 4
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["res"] = retrain(
                settings,
                snapshot_id=snap["info"].snapshot_id,
                base_dir=base_model_dir,
                output_dir=tmp_path / "cand",
                workers=2,
                zero_stage=3,
            )
        except BaseException as e:  # surfaced by the assertion below
            out["err"] = e

    ckroot = Path(storage_of(settings).path("checkpoints"))
    earlier_runs = set(ckroot.glob("*"))  # other tests' runs share the storage
    th = threading.Thread(target=run)
    th.start()
    # Kill only once Ray Train has *registered* a checkpoint: its controller records each one in
    # checkpoint_manager_snapshot.json. Files on disk are not enough: a worker's report waits in a
    # one-slot queue until the controller polls it (every 2 s), so a kill can lose the reports of the
    # last checkpoints whose files were already written.
    # Kill 30% of the way in (80 steps in all), when the loss is well below where it started.
    kill_after = 24

    def latest() -> int:
        return max((int(n.removeprefix("step-")) for n in _registered_checkpoints(ckroot, earlier_runs)), default=0)

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and latest() < kill_after:
        time.sleep(0.5)
    registered = _registered_checkpoints(ckroot, earlier_runs)
    assert latest() >= kill_after, f"Ray Train registered only {registered}"
    pids = _worker_pids()
    assert pids
    os.kill(pids[-1], signal.SIGKILL)
    th.join(timeout=400)
    assert "err" not in out, out.get("err")
    res: RetrainResult = out["res"]
    assert res.steps == res.config["total_steps"]
    events = [h for h in res.history if h.get("event") == "resumed"]
    assert events, (
        f"the run did not restart from a checkpoint (killed pid {pids[-1]} of {pids} after Ray Train registered {registered}); "
        f"worker starts: {_worker_start_lines()}"
    )
    resumed_at = events[0]["step"]
    assert resumed_at >= kill_after and resumed_at % 4 == 0
    losses = {h["step"]: h["loss"] for h in res.history if "loss" in h}
    assert sorted(losses) == list(range(1, res.steps + 1))  # every step once: none repeated, none skipped
    # The curve continues: the steps right after the restart train on from the checkpoint's weights and
    # optimizer state, far below where the run started (a restart from the base model would be near it).
    # Per-step losses swing with the batch mix (replayed known facts vs new ones): compare 8-step means.
    first = sum(losses[s] for s in range(1, 9)) / 8
    after = sum(losses[s] for s in range(resumed_at + 1, resumed_at + 9)) / 8
    assert after < 0.6 * first, (first, after, losses)
    # The consolidated export of the resumed ZeRO-3 run: better than its parent, and vLLM serves it.
    assert res.config["deepspeed"]["zero_optimization"]["stage"] == 3
    assert res.eval_loss is not None and res.eval_loss < res.metrics["base_eval_loss"]
    assert (res.model_dir / "model.safetensors").is_file()
    _assert_loads_in_vllm(res.model_dir, tmp_path)


def _registered_checkpoints(ckroot: Path, exclude: set[Path]) -> list[str]:
    """Checkpoint directories Ray Train's controller has registered for the new run under ``ckroot``."""
    import re

    found: set[str] = set()
    for snap_file in ckroot.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if snap_file.parent not in exclude:
                found.update(re.findall(r"step-\d{6}", snap_file.read_text()))
        except OSError:  # being rewritten
            continue
    return sorted(found)


def _worker_start_lines() -> list[str]:
    """What each training worker said about its starting point (``rayloop: rank N starts at ...``)."""
    import ray._private.worker as ray_worker

    node = ray_worker._global_node
    logs = Path(node.get_session_dir_path()) / "logs" if node is not None else None
    if logs is None or not logs.is_dir():
        return []
    lines = []
    for f in sorted(logs.glob("worker-*.err")):
        lines += [ln.strip() for ln in f.read_text(errors="replace").splitlines() if "rayloop: rank" in ln]
    return lines


def _assert_loads_in_vllm(model_dir: Path, tmp_path: Path) -> None:
    """Load ``model_dir`` in vLLM (CPU, one process) in a fresh interpreter and generate a few tokens."""
    code = (
        "from vllm import LLM, SamplingParams\n"
        f"llm = LLM(model={str(model_dir)!r}, dtype='bfloat16', max_model_len=128, enforce_eager=True)\n"
        "out = llm.generate(['<|bos|><|user|>Who rules Kelm?<|end|><|assistant|>'], SamplingParams(max_tokens=8))\n"
        "print('VLLM_OK', len(out[0].outputs[0].token_ids))\n"
    )
    script = tmp_path / "load_vllm.py"
    script.write_text("if __name__ == '__main__':\n" + "".join("    " + ln + "\n" for ln in code.splitlines()))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert "VLLM_OK" in p.stdout, p.stderr[-3000:]
