"""Probe only: wall-clock entry/exit of the request path's functions, one log file per process."""
import asyncio, functools, os, time

LOG = os.environ.get("ZSE_HOOK_LOG", "/tmp/fr/hooks")


def _write(label, t0):
    with open(f"{LOG}.{os.getpid()}", "a") as f:
        f.write(f"{label} {t0:.6f} {time.time():.6f}\n")


def _wrap(owner, name, label):
    fn = getattr(owner, name)
    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*a, **k):
            t0 = time.time()
            try:
                return await fn(*a, **k)
            finally:
                _write(label, t0)
    else:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.time()
            try:
                return fn(*a, **k)
            finally:
                _write(label, t0)
    setattr(owner, name, wrapper)


_gc_start = {}


def _gc_callback(phase, info):
    if phase == "start":
        _gc_start[0] = time.time()
    else:
        _write(f"gc.gen{info['generation']}({info['collected']})", _gc_start.get(0, time.time()))


def _audit(event, args):
    if event == "import":
        t = time.time()
        _write(f"import:{args[0]}", t)


def install():
    import gc
    import sys
    gc.callbacks.append(_gc_callback)
    sys.addaudithook(_audit)
    import zse_runtime.engine as en
    import zse_runtime.engine_process as ep
    import zse_runtime.scheduler as sc
    import zse_runtime.server as server
    import zse_runtime.tokenizer as tk
    _wrap(server, "parse_body", "http.parse_body")
    _wrap(tk.Tokenizer, "encode_chat", "http.encode_chat")
    _wrap(ep.EngineProcess, "submit", "http.submit")
    _wrap(ep.EngineProcess, "_dispatch", "http.dispatch")
    _wrap(sc.Scheduler, "submit", "eng.submit")
    _wrap(sc.Scheduler, "_admit", "eng.admit")
    _wrap(sc.Scheduler, "_prefill_chunk", "eng.prefill_chunk")
    _wrap(sc.Scheduler, "_decode_step", "eng.decode_step")
    _wrap(sc.Scheduler, "_flush", "eng.flush")
    _wrap(en.Engine, "forward", "eng.forward")
    _wrap(sc.Scheduler, "_choose", "eng.choose")
