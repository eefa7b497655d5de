"""Device probe: where does the first request after start-up spend its time?
(a) in process: Engine.open, then generate(16 ids, 1 token) six times, cProfile of calls 0 and 1;
(b) zse-run: /health, then six sequential streamed 1-token chat requests (bench_coldstart's)."""
import cProfile, io, json, os, pstats, subprocess, sys, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.getcwd() + "/scripts")
out = {}
path = sys.argv[1]
mode = sys.argv[2]
DEVICE = sys.argv[3] if len(sys.argv) > 3 else "cuda"
os.makedirs("/tmp/fr", exist_ok=True)
if mode == "engine":
    from zse_runtime.engine import Engine
    t = time.perf_counter()
    engine = Engine.open(path, device=DEVICE, max_model_len=4096, slots=1, load_tokenizer=False)
    out["open_s"] = time.perf_counter() - t
    ids = list(range(1000, 1016))
    times = []
    for i in range(8):
        prof = cProfile.Profile() if i == 7 else None
        t = time.perf_counter()
        if prof: prof.enable()
        tokens = list(engine.generate(ids, 1, ignore_eos=True))
        if prof: prof.disable()
        times.append((time.perf_counter() - t) * 1000)
        if prof:
            s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
            print(f"--- call {i}: {times[-1]:.1f} ms\n" + "\n".join(l for l in s.getvalue().splitlines() if l.strip()))
    # a different prompt length (new shapes) and a longer one
    for n in (7, 33, 16):
        t = time.perf_counter(); list(engine.generate(list(range(2000, 2000 + n)), 1, ignore_eos=True))
        times.append((time.perf_counter() - t) * 1000)
    out["generate_ms"] = times
    print("engine", json.dumps(out))
else:
    import httpx, benchlib
    CHAT = {"messages": [{"role": "user", "content": "Name one colour."}], "max_tokens": 1,
            "temperature": 0, "stream": True, "ignore_eos": True, "model": "m"}
    server = benchlib.launch_server(__import__("pathlib").Path(path), benchlib.free_port(), "--max-model-len", "4096", "--max-num-seqs", "1", device=DEVICE, log_dir=__import__("pathlib").Path("/tmp/fr"))
    lat, ttft = [], []
    def ttft_sum():
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith("zse_time_to_first_token_seconds_sum"):
                return float(line.split()[-1])
    try:
        for i in range(6):
            before = ttft_sum()
            sent = time.perf_counter()
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=CHAT, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        c = json.loads(line[6:]).get("choices") or []
                        if c and (c[0]["delta"].get("content") or c[0].get("finish_reason")):
                            lat.append((time.perf_counter() - sent) * 1000); break
            time.sleep(0.05)
            ttft.append((ttft_sum() - before) * 1000)
        h = []
        for i in range(3):
            t = time.perf_counter(); httpx.get(f"{server.url}/health"); h.append((time.perf_counter() - t) * 1000)
    finally:
        server.stop()
    print("server chat_ms", [round(x, 1) for x in lat], "server_ttft_ms", [round(x, 1) for x in ttft], "health_ms", [round(x, 1) for x in h])
    print(server.log_text()[-600:])
