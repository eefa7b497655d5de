#!/usr/bin/env bash
# Device run (2026-12-02, twenty-first session, last call): gpu_check --skip-speed on the final
# tree (its two synthetic models now converted by one helper).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout 300 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | grep -E "FAIL|passed" | tail -6
