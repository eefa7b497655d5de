#!/usr/bin/env bash
# Device run (2026-12-02, nineteenth session, third call): the server part of bench_decode (4 and
# 32 streams through zse-run's HTTP API) and bench_coldstart (warm and dropped page cache), this
# tree (decode steps launched ahead) against HEAD before it (ab/old), on the 7B synthetic file
# with the INT4 lm_head.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/d
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
n=0
for t in new old new old; do
  n=$((n+1)); d=$ROOT; [ $t = old ] && d=$ROOT/ab/old
  (cd $d && timeout 100 python3 scripts/bench_decode.py --parts server --streams 4,32 --zse /tmp/zse_bench/q7.zse \
    --runs 1 --out /tmp/d/$n-$t-server 2>&1 | grep -iE "error|Traceback" | head -4)
done
for t in new old; do
  n=$((n+1)); d=$ROOT; [ $t = old ] && d=$ROOT/ab/old
  (cd $d && timeout 120 python3 scripts/bench_coldstart.py --zse /tmp/zse_bench/q7.zse --out /tmp/d/$n-$t-cold --runs 2 2>&1 | grep -iE "error|Traceback|zse (warm|cold)" | head -24)
done
python3 - <<'PY'
import glob, json, os
out = {}
for f in sorted(glob.glob('/tmp/d/*/*.json'), key=lambda f: int(f.split('/')[3].split('-')[0])):
    out[f.split('/')[3]] = json.load(open(f))
json.dump(out, open(os.environ['OUT'] + '/launch_ahead_server_coldstart.json', 'w'), indent=1)
for name, r in out.items():
    if 'server' in r:
        print(name, [(l['streams'], round(l['aggregate_tok_s'])) for l in r['server']['levels']])
PY
