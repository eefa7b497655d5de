#!/usr/bin/env bash
# Device run (2026-12-01): disk probe, then bench_coldstart for HEAD (ab/old), the read-ahead with
# 4 readers (this tree) and with 1 (ab/new1), alternating.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/b
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
nproc; df -hT /tmp | tail -1
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
timeout 200 python3 docs/results/disk_read_ahead_probe_2026-12-01.py /tmp/zse_bench/q7.zse $OUT/disk_probe.json
for t in old new new1 new1 new old; do
  n=$((n+1)); d=$ROOT; [ $t != new ] && d=$ROOT/ab/$t
  (cd $d && timeout 150 python3 scripts/bench_coldstart.py --zse /tmp/zse_bench/q7.zse --out /tmp/b/$n-$t --runs 2 2>&1 | tail -14)
done
python3 - <<'PY'
import json, glob, os
out = {}
for f in sorted(glob.glob('/tmp/b/*/bench_coldstart.json')):
    out[f.split('/')[3]] = json.load(open(f))
json.dump(out, open(os.environ['OUT'] + '/read_ahead_ab.json', 'w'), indent=1)
rows = []
for name, r in out.items():
    z = r.get('zse')
    if isinstance(z, dict):
        for c in ('warm', 'cold'):
            runs = z.get(c, {}).get('runs', []) if isinstance(z.get(c), dict) else []
            rows.append((name, c, [round(x.get('spawn_to_health_200_s', 0), 3) for x in runs] if runs else z.get(c)))
for row in rows: print(*row)
PY
cp /tmp/b/2-new/coldstart_waterfall.png $OUT/ 2>/dev/null; true
