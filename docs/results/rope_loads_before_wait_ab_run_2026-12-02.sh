#!/usr/bin/env bash
# Device run (2026-12-02, nineteenth session, eighth call): rope_and_cache loads its positions,
# slots, cos/sin and bias before griddepcontrol.wait, against HEAD (ab/old, `git archive HEAD
# zse_runtime scripts zse_convert`), alternating twice on the 7B synthetic file with the INT4
# lm_head (engine part), after gpu_check --skip-speed on this tree.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/d
timeout 200 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | grep -E "FAIL|rope|passed" | tail -6
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
n=0
for t in new old new old; do
  n=$((n+1)); d=$ROOT; [ $t = old ] && d=$ROOT/ab/old
  (cd $d && timeout 100 python3 scripts/bench_decode.py --parts engine --zse /tmp/zse_bench/q7.zse \
    --contexts 128,2048 --decode-tokens 128 --prefill 2048 --runs 1 --out /tmp/d/$n-$t 2>&1 | grep -iE "error|Traceback" | head -3)
done
python3 - <<'PY'
import glob, json, os
out = {f.split('/')[3]: json.load(open(f)) for f in sorted(glob.glob('/tmp/d/[0-9]*/bench_decode.json'))}
json.dump(out, open(os.environ['OUT'] + '/rope_loads_ab.json', 'w'), indent=1)
for name, r in out.items():
    e = r['engine']
    steps = ' '.join(f"{x['context']}/{x['sampling'][0]} {x['gpu_step_ms']:.4f}ms {x['tok_s']:.1f}" for x in e['decode'])
    print(f"{name:6s} {steps} prefill {[round(p['tok_s']) for p in e['prefill']]}")
PY
