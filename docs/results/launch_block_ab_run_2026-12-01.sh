#!/usr/bin/env bash
# Device run: launch parameters packed into one reusable block (this tree) against HEAD (ab/old).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/fr /tmp/b
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
cat /tmp/zse_bench/q7.zse > /dev/null
for t in new old new old; do
  d=$ROOT; [ $t = old ] && d=$ROOT/ab/old
  echo "== $t engine"; (cd $d && timeout 200 python3 $ROOT/docs/results/first_request_probe_2026-12-01.py /tmp/zse_bench/q7.zse engine 2>&1 | tee -a $OUT/engine_$t.txt | grep -E "^engine|call 7|function calls")
  echo "== $t server"; (cd $d && timeout 120 python3 $ROOT/docs/results/first_request_probe_2026-12-01.py /tmp/zse_bench/q7.zse server 2>&1 | tee -a $OUT/server_$t.txt | head -1)
done
for t in new old new old; do
  n=$((n+1)); d=$ROOT; [ $t = old ] && d=$ROOT/ab/old
  (cd $d && timeout 150 python3 scripts/bench_coldstart.py --zse /tmp/zse_bench/q7.zse --out /tmp/b/$n-$t --runs 3 --no-cold 2>&1 | grep -E "error|Error" | head -3)
done
python3 - <<'PY'
import json, glob, os
out = {f.split('/')[3]: json.load(open(f)) for f in sorted(glob.glob('/tmp/b/*/bench_coldstart.json'))}
json.dump(out, open(os.environ['OUT'] + '/launch_ab_coldstart.json', 'w'), indent=1)
for name, r in out.items():
    runs = r['zse']['warm']['runs']
    print(name, "health", [round(x['spawn_to_health_200_s'], 3) for x in runs], "first token", [round(x['spawn_to_first_token_s'], 3) for x in runs], "request", [round(x['chat_request_to_first_token_s'], 3) for x in runs])
PY
timeout 300 python3 scripts/gpu_check.py --out $OUT --skip-speed 2>&1 | tail -4
