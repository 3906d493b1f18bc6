#!/usr/bin/env bash
# The README's test command: install what the tests need, then lint, type-check
# and run the whole suite (unit + integration on real Ray, vLLM CPU, DeepSpeed,
# SQLite, PostgreSQL, S3 via moto, Prometheus, headless Chromium).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m unit         # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
# PostgreSQL server binaries for the registry's PostgreSQL tests (the tests start
# and stop their own throwaway server).
if [ -f scripts/ci_postgres.sh ]; then
    bash scripts/ci_postgres.sh
fi
# Prometheus (the dashboard's queries and alert rules) and Chromium (the web console) for the tests.
bash scripts/ci_system_packages.sh

echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
# The control plane is held to the whole of `mypy --strict` (pyproject's overrides approximate it for the
# daily run; this is the real flag set).
echo "== mypy --strict (rollout, serving, pipeline)"; .venv/bin/mypy --strict rayloop/rollout rayloop/serving rayloop/pipeline.py
echo "== pytest"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
set +e
.venv/bin/python -m pytest -q --durations=30 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test: pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
exit "$rc"
