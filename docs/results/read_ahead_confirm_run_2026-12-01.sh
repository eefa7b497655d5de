#!/usr/bin/env bash
# Device run (2026-12-01, second call): the committed read-ahead (this tree) against 847aad6
# (ab/old), cold and warm, alternating; then gpu_check --skip-speed on this tree.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/b
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
for t in new old new old new old; do
  n=$((n+1)); d=$ROOT; [ $t != new ] && d=$ROOT/ab/$t
  (cd $d && timeout 150 python3 scripts/bench_coldstart.py --zse /tmp/zse_bench/q7.zse --out /tmp/b/$n-$t --runs 2 2>&1 | grep -E "health|engine_open|error|Error" | head -4)
done
python3 - <<'PY'
import json, glob, os
out = {f.split('/')[3]: json.load(open(f)) for f in sorted(glob.glob('/tmp/b/*/bench_coldstart.json'))}
json.dump(out, open(os.environ['OUT'] + '/read_ahead_confirm.json', 'w'), indent=1)
for name, r in out.items():
    z = r['zse']
    print(name, *(f"{c} {[round(x['spawn_to_health_200_s'], 3) for x in z[c]['runs']]}" for c in ('warm', 'cold') if isinstance(z.get(c), dict)))
PY
cp /tmp/b/1-new/coldstart_waterfall.png $OUT/ 2>/dev/null
timeout 300 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | tail -8
