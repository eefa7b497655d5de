#!/usr/bin/env bash
# Device run (2026-12-01, sixteenth session, last call): the launch parameters packed into one
# reusable block (this tree) against HEAD (ab/old), every package and the repo byte-compiled
# (as a normal pip install leaves them; the device image ships without .pyc files).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/b /tmp/fr
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
SITE=$(python3 -c "import jinja2, os; print(os.path.dirname(os.path.dirname(jinja2.__file__)))")
python3 -m compileall -q -j 0 /tmp/site $SITE $ROOT/zse_runtime $ROOT/ab/old/zse_runtime $ROOT/scripts $ROOT/ab/old/scripts > /dev/null 2>&1
echo "compiled: $SITE"
cat /tmp/zse_bench/q7.zse > /dev/null
n=0
for t in new old new old; do
  n=$((n+1)); d=$ROOT; [ $t = old ] && d=$ROOT/ab/old
  (cd $d && timeout 150 python3 scripts/bench_coldstart.py --zse /tmp/zse_bench/q7.zse --out /tmp/b/$n-$t --runs 3 --no-cold 2>&1 | grep -E "error|Error" | head -3)
done
for t in new old; do
  d=$ROOT; [ $t = old ] && d=$ROOT/ab/old
  echo "== $t"; (cd $d && timeout 200 python3 $ROOT/docs/results/first_request_probe_2026-12-01.py /tmp/zse_bench/q7.zse engine 2>&1 | grep -E "^engine" | tee $OUT/engine_$t.txt)
  (cd $d && timeout 120 python3 $ROOT/docs/results/first_request_probe_2026-12-01.py /tmp/zse_bench/q7.zse server 2>&1 | head -1 | tee $OUT/server_$t.txt)
done
python3 - <<'PY'
import json, glob, os, statistics as st
out = {f.split('/')[3]: json.load(open(f)) for f in sorted(glob.glob('/tmp/b/[0-9]*/bench_coldstart.json'), key=lambda f: int(f.split('/')[3].split('-')[0]))}
json.dump(out, open(os.environ['OUT'] + '/launch_block_pyc_coldstart.json', 'w'), indent=1)
for name, r in out.items():
    runs = r['zse']['warm']['runs']
    h = [x['spawn_to_health_200_s'] for x in runs]; f = [x['spawn_to_first_token_s'] for x in runs]; q = [x['chat_request_to_first_token_s'] for x in runs]
    print(f"{name:8s} health {st.median(h):.3f} {[round(x, 3) for x in h]}  first token {st.median(f):.3f} {[round(x, 3) for x in f]}  request {[round(x, 3) for x in q]}")
PY
