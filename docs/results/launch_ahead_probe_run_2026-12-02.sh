#!/usr/bin/env bash
# Device run (2026-12-02, nineteenth session, first call): launch_ahead_probe_2026-12-02.py on the
# 7B synthetic file with the INT4 lm_head.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/zse_bench
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
timeout 200 python3 docs/results/launch_ahead_probe_2026-12-02.py /tmp/zse_bench/q7.zse 2>&1 | tail -25
