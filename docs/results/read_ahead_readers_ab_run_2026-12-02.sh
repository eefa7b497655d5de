#!/usr/bin/env bash
# Device run (2026-12-02, twentieth session): the cold start's read-ahead with more requests in
# flight. HEAD ("new": one reader of 8 MiB) against ab/r8 (8 readers of 16 MiB, chunks k, k + 8,
# ..., the upload's pattern) and ab/r2 (2 readers of 8 MiB), each running until the upload
# overtakes it; bench_coldstart --runs 2, three rounds alternating, 7B synthetic file with the
# INT4 lm_head and Qwen2.5's tokenizer.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
mkdir -p /tmp/zse_bench /tmp/b
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
n=0
for t in new r8 r2 new r8 r2 new r8 r2; do
  n=$((n+1)); d=$ROOT; [ $t != new ] && d=$ROOT/ab/$t
  (cd $d && timeout 150 python3 scripts/bench_coldstart.py --zse /tmp/zse_bench/q7.zse --out /tmp/b/$n-$t --runs 2 2>&1 | grep -iE "error|traceback" | head -3)
done
python3 - <<'PY'
import json, glob, os, statistics as st
out = {}
for f in sorted(glob.glob('/tmp/b/*/bench_coldstart.json')):
    out[f.split('/')[3]] = json.load(open(f))
json.dump(out, open(os.environ['OUT'] + '/read_ahead_readers_ab.json', 'w'), indent=1)
agg = {}
for name, r in out.items():
    z = r.get('zse')
    for c in ('warm', 'cold'):
        runs = z.get(c, {}).get('runs', []) if isinstance(z, dict) and isinstance(z.get(c), dict) else []
        h = [round(x['spawn_to_health_200_s'], 3) for x in runs]
        agg.setdefault((name.split('-')[1], c), []).extend(h)
        print(name, c, 'health', h, 'upload', [round(x['stages_s'].get('upload', 0), 3) for x in runs],
              'context', [round(x['stages_s'].get('context (overlapped)', 0), 3) for x in runs])
for (t, c), v in sorted(agg.items()):
    print(t, c, 'median', round(st.median(v), 3), 'min', min(v), 'max', max(v))
PY
