#!/usr/bin/env bash
# Device run (2026-12-02, eighteenth session, fifth call): the final tree (dependent launches gated
# on a CUDA 12.3+ driver): gpu_check --skip-speed, then one decode benchmark on the 7B synthetic
# file with the INT4 lm_head.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c "from zse_runtime.gpu import driver; print('driver version', driver.driver_version())"
timeout 240 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | grep -E "FAIL|dependent|passed" | head -20
mkdir -p /tmp/zse_bench
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
timeout 120 python3 scripts/bench_decode.py --parts engine --zse /tmp/zse_bench/q7.zse --contexts 128,2048 \
  --decode-tokens 128 --prefill 2048 --runs 1 --out $OUT 2>&1 | grep -E "decode|prefill|rror" | head -8
python3 - <<'PY'
import json, os
e = json.load(open(os.environ['OUT'] + '/bench_decode.json'))['engine']
print(' '.join(f"{x['context']}/{x['sampling'][0]} {x['gpu_step_ms']:.4f} ms {x['tok_s']:.1f}" for x in e['decode']))
PY
