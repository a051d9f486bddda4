#!/usr/bin/env bash
# Sets up ./.venv (idempotent) and runs the fast tier of the test suite: every test not marked `slow`.
# Extra arguments go to pytest; a later -m replaces the tier: `-m slow` runs the slow tier (multi-process DDP,
# TRL, bench, the real SmolLM2 model, repeated grid runs), `-m ""` runs everything. .ci/run runs both tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
