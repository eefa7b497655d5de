#!/usr/bin/env bash
# Device run (2026-12-02, twentieth session): the decode attention loads 16 value rows per round
# instead of 8 (attention.DECODE_VALUE_ROWS; this tree, "new"), and 32 (ab/v32), against HEAD
# (ab/old, `git archive HEAD zse_runtime scripts zse_convert`): gpu_check's attention check from
# each tree; gpu_check --skip-speed on this tree; then the 7B synthetic file with the INT4
# lm_head, bench_decode's engine part alternating twice.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/d $OUT/attention
n=0
for t in new old v32; do
  n=$((n+1)); d=$ROOT; [ $t != new ] && d=$ROOT/ab/$t
  (cd $d && timeout 120 python3 - <<PY 2>&1 | grep -E "attention|Error|Traceback" | sed "s/^/$n-$t /"
import json, sys
sys.path.insert(0, "scripts")
import numpy as np
import gpu_check as g
gpu = g.Gpu()
g.attention(gpu, np.random.default_rng(0))
json.dump(g.RESULTS, open("$OUT/attention/$n-$t.json", "w"), indent=1)
PY
)
done
timeout 240 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | grep -E "FAIL|passed" | tail -6
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
n=0
for t in new old v32 new old v32; do
  n=$((n+1)); d=$ROOT; [ $t != new ] && d=$ROOT/ab/$t
  (cd $d && timeout 100 python3 scripts/bench_decode.py --parts engine --zse /tmp/zse_bench/q7.zse \
    --contexts 128,2048 --decode-tokens 128 --prefill 2048 --runs 1 --out /tmp/d/$n-$t 2>&1 | grep -iE "error|Traceback" | head -3)
done
python3 - <<'PY'
import glob, json, os
out = {f.split('/')[3]: json.load(open(f)) for f in sorted(glob.glob('/tmp/d/[0-9]*/bench_decode.json'))}
att = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob(os.environ['OUT'] + '/attention/*.json'))}
json.dump({"bench_decode": out, "attention": att}, open(os.environ['OUT'] + '/attention_value_rows_ab.json', 'w'), indent=1)
for name, rows in att.items():
    print(f"{name:6s} " + " | ".join(f"{r['check'].replace('attention ', '')[:34]} {r.get('us', float('nan')):.1f}" for r in rows if 'us' in r and 'tiled' not in r['check']))
for name, r in out.items():
    e = r['engine']
    steps = ' '.join(f"{x['context']}/{x['sampling'][0]} {x['gpu_step_ms']:.4f}ms {x['tok_s']:.1f}" for x in e['decode'])
    print(f"{name:6s} {steps} prefill {[round(p['tok_s']) for p in e['prefill']]}")
PY
