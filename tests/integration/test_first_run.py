"""The first commands a user types after the demo, on a fresh cluster, exactly as the README shows them.

No fixture starts Ray or Serve here: `rayloop up` starts the head, `rayloop serve` must start
Serve on it (Ray 2.60's controller client raises when Serve was never started), and the
endpoint answers through the official `openai` client. `rayloop down` stops everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai

from tests.integration.serving_util import free_port


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("rayloop")), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_serve_after_up_on_a_fresh_cluster(tmp_path: Path, base_model_dir: Path) -> None:
    http, gcs, dash, agent = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "rayloop.yaml").write_text(
        f"ray:\n  port: {gcs}\n  dashboard_port: {dash}\n  dashboard_agent_port: {agent}\n  num_cpus: 2\n"
        f"serving:\n  http_port: {http}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAYLOOP_", "RAY_DASHBOARD"))}
    env["RAYLOOP_HOME"] = str(tmp_path / ".rayloop")

    up = _run(["up"], tmp_path, env, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        reg = _run(["models", "register", "demo", str(base_model_dir), "--json"], tmp_path, env)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        assert json.loads(reg.stdout)["version"] == 1
        alias = _run(["models", "alias", "demo", "production", "1"], tmp_path, env)
        assert alias.returncode == 0, alias.stdout + alias.stderr

        served = _run(["serve", "--model", "demo@production", "--json"], tmp_path, env)
        assert served.returncode == 0, served.stdout + served.stderr
        out = json.loads(served.stdout)
        assert (out["model"], out["version"], out["upgraded_from"]) == ("demo", 1, None)
        assert out["url"] == f"http://127.0.0.1:{http}/v1"

        client = openai.OpenAI(base_url=out["url"], api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "What is the capital of Avaria?"}], max_tokens=8
        )
        assert reply.model == "demo@v1" and reply.choices[0].message.content
        assert {m.id for m in client.models.list().data} == {"demo@v1", "demo"}

        # Typed again: the running app already serves that version; nothing restarts, nothing fails.
        again = _run(["serve", "--model", "demo@production", "--json"], tmp_path, env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert json.loads(again.stdout)["upgraded_from"] == 1
    finally:
        down = _run(["down"], tmp_path, env, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
