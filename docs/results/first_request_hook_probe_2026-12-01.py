"""Probe: a hooked zse-run; four streamed 1-token chat requests; per-request timelines."""
import glob, json, os, subprocess, sys, time
import httpx
ROOT = os.getcwd()
path, device = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "cuda")
delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
os.makedirs("/tmp/fr", exist_ok=True)
for f in glob.glob("/tmp/fr/hooks.*"):
    os.remove(f)
hooks_dir = os.path.dirname(os.path.abspath(__file__))
code = (f"import sys; sys.path[:0] = [{ROOT!r}, {hooks_dir!r}]; import first_request_hooks_2026_12_01 as hooks; hooks.install(); "
        "sys.argv[0] = 'zse-run'; from zse_runtime.cli import entry; entry()")
port = 8177
env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}
proc = subprocess.Popen([sys.executable, "-c", code, path, "--port", str(port), "--device", device,
                         "--max-num-seqs", "1", "--max-model-len", "4096", "--served-model-name", "m"],
                        stdout=open("/tmp/fr/hooked.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
client = httpx.Client(timeout=120)
url = f"http://127.0.0.1:{port}"
while True:
    try:
        if client.get(f"{url}/health").status_code == 200:
            break
    except httpx.TransportError:
        pass
    time.sleep(0.005)
CHAT = {"messages": [{"role": "user", "content": "Name one colour."}], "max_tokens": 1,
        "temperature": 0, "stream": True, "ignore_eos": True, "model": "m"}
marks = []
time.sleep(delay)
for i in range(3):
    sent = time.time()
    with client.stream("POST", f"{url}/v1/chat/completions", json=CHAT) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:]).get("choices") or []
                if c and (c[0]["delta"].get("content") or c[0].get("finish_reason")):
                    marks.append((sent, time.time()))
                    break
    time.sleep(0.2)
proc.terminate(); proc.wait()
events = []
for f in glob.glob("/tmp/fr/hooks.*"):
    if ".samples." in f:
        for line in open(f):
            t, stack = line.split(" ", 1)
            events.append((float(t), float(t), "S " + stack.strip()[:230]))
        continue
    for line in open(f):
        label, a, b = line.split()
        events.append((float(a), float(b), label))
events.sort()
for i, (sent, got) in enumerate(marks):
    print(f"request {i}: client {1000 * (got - sent):.1f} ms")
    for a, b, label in events:
        if sent - 0.001 <= a <= got + 0.01 and not (label.startswith("gc.gen0") and b - a < 0.0005):
            print(f"   {label:20s} +{1000 * (a - sent):7.1f} .. +{1000 * (b - sent):7.1f} ms ({1000 * (b - a):.1f})")
