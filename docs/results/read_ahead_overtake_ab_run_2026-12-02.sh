#!/usr/bin/env bash
# Device run (2026-12-02, twentieth session): the read-ahead goes on until the upload's readers
# reach what it has not read (this tree, "new") against HEAD (ab/old: stopped as the upload
# begins). bench_coldstart --runs 2 alternating, on the 7B synthetic file with the INT4 lm_head
# and Qwen2.5's tokenizer; then the disk timeline probe on this tree.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/b
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
n=0
for t in new old new old new old; do
  n=$((n+1)); d=$ROOT; [ $t != new ] && d=$ROOT/ab/$t
  (cd $d && timeout 150 python3 scripts/bench_coldstart.py --zse /tmp/zse_bench/q7.zse --out /tmp/b/$n-$t --runs 2 2>&1 | grep -iE "error|traceback" | head -3)
done
python3 - <<'PY'
import json, glob, os
out = {}
for f in sorted(glob.glob('/tmp/b/*/bench_coldstart.json')):
    out[f.split('/')[3]] = json.load(open(f))
json.dump(out, open(os.environ['OUT'] + '/read_ahead_overtake_ab.json', 'w'), indent=1)
for name, r in out.items():
    z = r.get('zse')
    for c in ('warm', 'cold'):
        runs = z.get(c, {}).get('runs', []) if isinstance(z, dict) and isinstance(z.get(c), dict) else []
        print(name, c, 'health', [round(x['spawn_to_health_200_s'], 3) for x in runs],
              'token', [round(x['spawn_to_first_token_s'], 3) for x in runs],
              'upload', [round(x['stages_s'].get('upload', 0), 3) for x in runs],
              'engine_open', [round(x['spawn_to_engine_open_s'], 2) for x in runs])
PY
timeout 200 python3 docs/results/cold_disk_timeline_probe_2026-12-02.py /tmp/zse_bench/q7.zse \
  $OUT/cold_disk_timeline_overtake_h200_2026-12-02.json --runs 2 2>&1 | grep -E "^run|^ 2\.|^ 3\.|log .*ready"
