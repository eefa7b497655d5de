#!/usr/bin/env bash
# Device run (2026-12-02, eighteenth session, third call): add_rmsnorm, rope_and_cache, the decode
# attention kernels and silu_mul also wait at entry and are launched as dependents ("all"),
# against the tree of the second call, where only the INT4 GEMVs are (ab/gemv, a copy of that
# working tree), and against this tree with ZSE_DEPENDENT_LAUNCH=0 ("serial"), alternating twice
# on the 7B synthetic file with the INT4 lm_head; then gpu_check --skip-speed on this tree.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/d
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
n=0
for t in all gemv serial all gemv serial; do
  n=$((n+1)); d=$ROOT; [ $t = gemv ] && d=$ROOT/ab/gemv
  mode=1; [ $t = serial ] && mode=0
  (cd $d && ZSE_DEPENDENT_LAUNCH=$mode timeout 150 python3 scripts/bench_decode.py --parts engine,batched --streams 1,4,8,32 --zse /tmp/zse_bench/q7.zse \
    --contexts 128,2048 --decode-tokens 128 --prefill 2048 --runs 1 --out /tmp/d/$n-$t 2>&1 | grep -iE "error|Traceback" | head -3)
done
timeout 300 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | grep -E "FAIL|dependent|passed" | head -20
python3 - <<'PY'
import glob, json, os
out = {f.split('/')[3]: json.load(open(f)) for f in sorted(glob.glob('/tmp/d/[0-9]*/bench_decode.json'))}
json.dump(out, open(os.environ['OUT'] + '/dependent_launch_all_ab.json', 'w'), indent=1)
for name, r in out.items():
    e = r['engine']
    steps = ' '.join(f"{x['context']}/{x['sampling'][0]} {x['gpu_step_ms']:.4f} ms {x['tok_s']:.1f}" for x in e['decode'])
    b = ' '.join(f"{l['streams']}:{l['gpu_step_ms']:.3f}" for l in r['batched']['levels'])
    print(f"{name:8s} {steps}  prefill {[round(p['tok_s']) for p in e['prefill']]}  batched gpu ms {b}")
PY
