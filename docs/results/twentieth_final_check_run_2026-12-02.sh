#!/usr/bin/env bash
# Device run (2026-12-02, twentieth session, last call): gpu_check --skip-speed on the final
# tree, then bench_coldstart --runs 2 (warm and cold) of the 7B synthetic file with the INT4
# lm_head and Qwen2.5's tokenizer.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/zse_bench
timeout 240 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | grep -E "FAIL|passed" | tail -6
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
timeout 200 python3 scripts/bench_coldstart.py --zse /tmp/zse_bench/q7.zse --out $OUT/coldstart --runs 2 2>&1 | tail -16
