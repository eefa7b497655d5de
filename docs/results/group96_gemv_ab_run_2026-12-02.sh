#!/usr/bin/env bash
# Device run (2026-12-02, twenty-first session, first call): the INT4 GEMV finds a word's group by a
# multiply-high instead of a shift, so groups of 96 work (this tree, "new"), against HEAD (ab/old,
# `git archive HEAD zse_runtime scripts zse_convert tests`): gpu_check --skip-speed on this tree (its
# synthetic llama with SmolLM2's 576 widths carries o_proj and gate_up at group 96); gpu_check's
# int4_gemv check (7B shapes, group 128) from each tree, alternating twice; then the 7B synthetic
# file with the INT4 lm_head, bench_decode's engine and batched parts alternating twice.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/d $OUT/gemv
timeout 300 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | grep -E "FAIL|passed|llama 576" | tail -12
n=0
for t in new old new old; do
  n=$((n+1)); d=$ROOT; [ $t != new ] && d=$ROOT/ab/$t
  (cd $d && timeout 150 python3 - <<PY 2>&1 | grep -E "Error|Traceback" | sed "s/^/$n-$t /"
import json, sys
sys.path.insert(0, "scripts")
import numpy as np
import gpu_check as g
gpu = g.Gpu()
g.gemv(gpu, g.copy_bandwidth(gpu), np.random.default_rng(0))
json.dump(g.RESULTS, open("$OUT/gemv/$n-$t.json", "w"), indent=1)
PY
)
done
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
n=0
for t in new old new old; do
  n=$((n+1)); d=$ROOT; [ $t != new ] && d=$ROOT/ab/$t
  (cd $d && timeout 100 python3 scripts/bench_decode.py --parts engine,batched --zse /tmp/zse_bench/q7.zse \
    --contexts 128,2048 --decode-tokens 128 --prefill 512 --streams 4,8 --runs 1 --out /tmp/d/$n-$t 2>&1 | grep -iE "error|Traceback" | head -3)
done
python3 - <<'PY'
import glob, json, os
out = {f.split('/')[3]: json.load(open(f)) for f in sorted(glob.glob('/tmp/d/[0-9]*/bench_decode.json'))}
gemv = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob(os.environ['OUT'] + '/gemv/*.json'))}
json.dump({"bench_decode": out, "gemv": gemv}, open(os.environ['OUT'] + '/group96_gemv_ab.json', 'w'), indent=1)
for name, rows in gemv.items():
    print(f"{name:6s} " + " | ".join(f"{r.get('shape')} T{r.get('tokens')} {r['us']:.2f}" for r in rows
                                     if 'us' in r and not r.get('sweep') and 'kernel' in r and 'gemv' in r['kernel']))
for name, r in out.items():
    e = r['engine']
    steps = ' '.join(f"{x['context']}/{x['sampling'][0]} {x['gpu_step_ms']:.4f}ms" for x in e['decode'])
    b = ' '.join(f"{l['streams']}: {l['step_ms']:.3f}ms" for l in r['batched']['levels'])
    print(f"{name:6s} {steps} | batched {b}")
PY
