#!/usr/bin/env bash
# Device run (2026-12-02, nineteenth session, seventh call): launch_ahead_remote_probe_2026-12-02.py
# (a remote start over ranged HTTP on loopback, then steps launched ahead) on the final tree.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout 240 python3 docs/results/launch_ahead_remote_probe_2026-12-02.py 2>&1 | tail -6
