"""Lease locks in the registry database (rayloop.registry.locks) and the Serve-config lock built on them."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rayloop.config import load_settings
from rayloop.errors import ClusterError, LeaseLostError
from rayloop.registry.locks import lease_lock
from rayloop.registry.registry import database_url
from rayloop.registry.sql import Database
from rayloop.registry.tables import ensure_schema

pytestmark = pytest.mark.unit


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(f"sqlite:///{tmp_path / 'registry.db'}")
    ensure_schema(d)
    return d


def test_one_holder_at_a_time_and_every_take_bumps_the_token(db: Database) -> None:
    inside: list[int] = []
    spans: list[tuple[float, float, int]] = []

    def work() -> None:
        with lease_lock(db, "x", ttl_s=5, holder=threading.current_thread().name) as held:
            inside.append(1)
            assert len(inside) == 1, "two holders at once"
            t0 = time.monotonic()
            time.sleep(0.02)
            held.check()
            inside.pop()
            spans.append((t0, time.monotonic(), held.token))

    threads = [threading.Thread(target=work, name=f"w{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(spans) == 6
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert [token for *_, token in spans] == [1, 2, 3, 4, 5, 6]  # a token is never handed out twice


def test_a_busy_lock_names_its_holder_after_the_wait(db: Database) -> None:
    with lease_lock(db, "x", ttl_s=5, holder="host-a:1:1"):
        with (
            pytest.raises(ClusterError, match=r"lock 'x' is held by host-a:1:1") as e,
            lease_lock(db, "x", ttl_s=5, wait_s=0.3),
        ):
            pass
        assert "retry when it is done" in (e.value.hint or "")


def test_an_expired_lock_is_taken_over_and_its_old_holder_finds_out(db: Database) -> None:
    with lease_lock(db, "x", ttl_s=0.6, holder="a") as a:
        a._stop.set()  # a's renewals stop, as in a frozen process
        with lease_lock(db, "x", ttl_s=5, wait_s=10, holder="b") as b:
            assert b.token == a.token + 1
            with pytest.raises(LeaseLostError, match=r"lock 'x' is no longer ours .* held by b"):
                a.check()
            b.check()
    # a's late release freed nothing of b's; the next holder gets a token never seen before.
    with lease_lock(db, "x", ttl_s=5, wait_s=1, holder="c") as c:
        assert c.token == b.token + 1


_FROZEN_HOLDER = """
import sys
from rayloop.config import load_settings
from rayloop.serving.control import serve_config_lock

settings = load_settings(env={"RAYLOOP_HOME": sys.argv[1]}, overrides={"rollout": {"lease_s": 1.0}})
with serve_config_lock(settings) as held:
    print("HELD", flush=True)
    sys.stdin.readline()  # the test freezes this process here
    try:
        held.check()  # what ServeControl does right before it applies
        print("APPLIED", flush=True)
    except Exception as e:
        print("ERROR", type(e).__name__, e, flush=True)
"""


def test_a_frozen_holder_of_the_serve_config_lock_blocks_nobody(tmp_path: Path) -> None:
    """The Serve-config lock used to be an open SQLite write transaction: a holder stopped by SIGSTOP kept
    every registry writer out ("database is locked"). Now it expires, and the holder stops when it wakes."""
    from rayloop.serving.control import SERVE_CONFIG_LOCK, serve_config_lock

    home = tmp_path / "home"
    settings = load_settings(env={"RAYLOOP_HOME": str(home)}, overrides={"rollout": {"lease_s": 1.0}})
    a = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_HOLDER, str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert a.stdout is not None and a.stdin is not None
        assert a.stdout.readline().strip() == "HELD"
        a.send_signal(signal.SIGSTOP)
        # Registry writes go on while A is frozen (a short busy timeout: a held write lock fails this at once).
        quick = Database(database_url(settings), busy_timeout_s=2)
        with quick.transaction(write=True) as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS probe (a BIGINT)")
            tx.execute("INSERT INTO probe VALUES (1)")
        # Once A's lease ran out, B takes the lock.
        with serve_config_lock(settings) as b:
            assert b.token == 2
        a.send_signal(signal.SIGCONT)
        a.stdin.write("go\n")
        a.stdin.flush()
        out, _ = a.communicate(timeout=30)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert out.startswith("ERROR LeaseLostError") and f"lock '{SERVE_CONFIG_LOCK}' is no longer ours" in out, out
