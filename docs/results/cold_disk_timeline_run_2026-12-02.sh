#!/usr/bin/env bash
# Device run (2026-12-02, twentieth session): the disk's timeline during three cold zse-run
# starts of the 7B synthetic file with the INT4 lm_head (cold_disk_timeline_probe_2026-12-02.py).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/zse_bench
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
cat /sys/block/vda/queue/read_ahead_kb /sys/block/vda/queue/scheduler 2>/dev/null
timeout 300 python3 docs/results/cold_disk_timeline_probe_2026-12-02.py /tmp/zse_bench/q7.zse \
  $OUT/cold_disk_timeline_h200_2026-12-02.json --runs 3
