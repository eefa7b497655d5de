#!/usr/bin/env bash
# Device run: warm start and first token, this tree (launch parameter block + anyio backend
# imported at start-up) against HEAD (ab/old); first with the staged wheels and the repo as
# earlier sessions ran them (no .pyc: pip --no-compile, PYTHONDONTWRITEBYTECODE), then with
# everything byte-compiled as a normal pip install leaves it.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
echo "python $(python3 -V 2>&1); PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE-unset}"
for m in jinja2 numba tokenizers typer; do d=$(python3 -c "import $m, os; print(os.path.dirname($m.__file__))"); echo "$m: $(ls $d/__pycache__ 2>/dev/null | wc -l) pyc in $d"; done
mkdir -p /tmp/zse_bench /tmp/b
gunzip -c .devcarry/qwen_tokenizer.json.gz > /tmp/zse_bench/tokenizer.json
python3 scripts/make_synthetic_zse.py /tmp/zse_bench/q7.zse --lm-head int4 --tokenizer /tmp/zse_bench/tokenizer.json 2>&1 | tail -1
find /tmp/site $ROOT -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null
cat /tmp/zse_bench/q7.zse > /dev/null
imports() { for i in 1 2 3; do python3 -X importtime -c "import numpy, starlette.applications, uvicorn, msgspec" 2>&1 | sort -t'|' -k2 -n | tail -1; done; }
echo "imports without pyc:"; imports
n=0
run() {  # $1 label
  for t in new old new old; do
    n=$((n+1)); d=$ROOT; [ $t = old ] && d=$ROOT/ab/old
    (cd $d && timeout 150 python3 scripts/bench_coldstart.py --zse /tmp/zse_bench/q7.zse --out /tmp/b/$n-$1-$t --runs 3 --no-cold 2>&1 | grep -E "error|Error" | head -3)
  done
}
run nopyc
python3 -m compileall -q -j 0 /tmp/site $ROOT/zse_runtime $ROOT/ab/old/zse_runtime $ROOT/scripts $ROOT/ab/old/scripts > /dev/null
echo "imports with pyc:"; imports
run pyc
python3 - <<'PY'
import json, glob, os, statistics as st
out = {f.split('/')[3]: json.load(open(f)) for f in sorted(glob.glob('/tmp/b/*/bench_coldstart.json'), key=lambda f: int(f.split('/')[3].split('-')[0]))}
json.dump(out, open(os.environ['OUT'] + '/pyc_launch_ab_coldstart.json', 'w'), indent=1)
for name, r in out.items():
    runs = r['zse']['warm']['runs']
    h = [x['spawn_to_health_200_s'] for x in runs]; f = [x['spawn_to_first_token_s'] for x in runs]; q = [x['chat_request_to_first_token_s'] for x in runs]
    print(f"{name:12s} health {st.median(h):.3f} {[round(x, 3) for x in h]}  first token {st.median(f):.3f} {[round(x, 3) for x in f]}  request {[round(x, 3) for x in q]}")
PY
