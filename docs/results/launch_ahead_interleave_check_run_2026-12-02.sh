#!/usr/bin/env bash
# Device run (2026-12-02, nineteenth session, ninth call): gpu_check --skip-speed on the tree whose
# decode steps are tickets (Engine.end_step(step)), with the interleaved generate() check added.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout 200 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | grep -E "FAIL|launch ahead|passed" | tail -12
