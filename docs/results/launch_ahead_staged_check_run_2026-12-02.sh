#!/usr/bin/env bash
# Device run (2026-12-02, nineteenth session, fifth call): the tree that keeps graphs (host-gathered rows) until the embedding is mapped:
# gpu_check --skip-speed; then launch_ahead_eager_window_2026-12-02.py on the 7B synthetic file
# with the INT4 lm_head, page cache warm and dropped.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/zse_bench
timeout 240 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | grep -E "FAIL|launch ahead|passed" | head -24
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
timeout 120 python3 docs/results/launch_ahead_eager_window_2026-12-02.py /tmp/zse_bench/q7.zse warm 2>&1 | tail -2
sync; echo 3 > /proc/sys/vm/drop_caches
timeout 120 python3 docs/results/launch_ahead_eager_window_2026-12-02.py /tmp/zse_bench/q7.zse cold 2>&1 | tail -2
timeout 150 python3 scripts/bench_decode.py --parts engine,batched --streams 1,4,8,32 --zse /tmp/zse_bench/q7.zse \
  --contexts 128,2048 --decode-tokens 128 --prefill 2048 --runs 1 --out $OUT 2>&1 | grep -iE "decode|engine|prefill|rror" | head -12
