#!/usr/bin/env bash
# Device run (2026-12-01, seventeenth session): the decode attention loading a warp's first batch
# of keys before staging q (this tree, 134 registers on sm_90), the same held to 128 registers
# (ab/cap, `MAX_REGISTERS = {"attention_decode": 128}` appended to its attention.py, its own
# prebuilt/) and HEAD (ab/old), alternating twice on the 7B synthetic file with the INT4 lm_head;
# then gpu_check --skip-speed on this tree and on ab/cap.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/d
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
n=0
for t in new old cap new old cap; do
  n=$((n+1)); d=$ROOT; [ $t != new ] && d=$ROOT/ab/$t
  (cd $d && timeout 150 python3 scripts/bench_decode.py --parts engine --zse /tmp/zse_bench/q7.zse \
    --contexts 128,2048,3900 --decode-tokens 128 --prefill 2048 --runs 1 --out /tmp/d/$n-$t 2>&1 | grep -iE "error|Traceback" | head -3)
done
mkdir -p $OUT/new $OUT/cap
timeout 200 python3 scripts/gpu_check.py --out $OUT/new --skip-speed 2>&1 | tail -1
(cd ab/cap && timeout 200 python3 scripts/gpu_check.py --out $OUT/cap --skip-speed 2>&1 | tail -1)
python3 - <<'PY'
import glob, json, os
out = {f.split('/')[3]: json.load(open(f)) for f in sorted(glob.glob('/tmp/d/[0-9]*/bench_decode.json'))}
json.dump(out, open(os.environ['OUT'] + '/attention_keys_ahead_ab.json', 'w'), indent=1)
for name, r in out.items():
    e = r['engine']
    steps = ' '.join(f"{x['context']}/{x['sampling'][0]} {x['gpu_step_ms']:.4f} ms {x['tok_s']:.1f}" for x in e['decode'])
    print(f"{name:6s} {steps}  prefill {[round(p['tok_s']) for p in e['prefill']]}")
PY
