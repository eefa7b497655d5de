"""Ahead-of-time build of every kernel: numba-cuda -> PTX -> cubin per architecture.

    python -m zse_runtime.kernels.build            # rewrite zse_runtime/kernels/prebuilt/
    python -m zse_runtime.kernels.build --check    # exit 1 if prebuilt/ is stale

Needs NVVM and nvJitLink (`pip install 'numba-cuda[cu12]'`) but no GPU. The serving path only
loads the outputs (a cubin loads in ~0.15 ms; numba JIT costs 0.2-1.6 s per kernel). PTX is
generated for compute capability 7.5 (the T4) with the CUDA 12 toolchain, whose PTX ISA the
CUDA 12.x and 13.0 drivers accept, so any newer GPU without a cubin can still JIT it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import multiprocessing
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .grid_dependency import MARKER, for_sm90, uses_grid_dependency

PREBUILT = Path(__file__).resolve().parent / "prebuilt"
MODULES = ("embedding", "gather", "rmsnorm", "quantize_activations", "gemv_int4", "gemm_int4",
           "gemv_fp16", "gemm_fp16", "rope_cache", "attention", "attention_tiled", "activation", "sampling")
ARCHITECTURES = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
PTX_COMPUTE_CAPABILITY = (7, 5)
# cubins whose kernels get griddepcontrol instructions in place of grid_dependency's markers
DEPENDENT_LAUNCH_ARCHITECTURES = ("sm_90",)
INDEX = "index.json"


def kernel_table() -> dict[str, tuple]:
    """Kernel name -> (python function, numba signature string), over every kernel module."""
    table = {}
    for module in MODULES:
        kernels = importlib.import_module(f"{__package__}.{module}").KERNELS
        overlap = set(table) & set(kernels)
        assert not overlap, f"kernel names defined twice: {overlap}"
        table.update(kernels)
    return table


def register_caps() -> dict[str, int]:
    """Kernel name -> the most registers ptxas may give one of its threads, for the kernels
    whose module sets one (MAX_REGISTERS: ptxas's own choice can cost memory-level
    parallelism, kernels/geometry.py)."""
    caps = {}
    for module in MODULES:
        kernels = importlib.import_module(f"{__package__}.{module}")
        caps.update(getattr(kernels, "MAX_REGISTERS", {}))
    return caps


def _cap_registers(text: str, registers: int) -> str:
    """The PTX with a `.maxnreg` directive between the entry's parameter list and its body."""
    capped, found = re.subn(r"(\.entry\s+[\w$]+\s*\([^()]*\))", rf"\1\n.maxnreg {registers}", text,
                            count=1)
    assert found == 1, "no entry parameter list in the PTX"
    return capped


def source_digest() -> str:
    """Hash of everything the binaries depend on: kernel sources, signatures, toolchain."""
    from numba_cuda import __version__ as numba_cuda_version

    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("build", "common", "geometry", "grid_dependency", "memory", "mma_tile",
                 *MODULES):
        digest.update((here / f"{name}.py").read_bytes())
    digest.update(repr((ARCHITECTURES, DEPENDENT_LAUNCH_ARCHITECTURES, PTX_COMPUTE_CAPABILITY,
                        numba_cuda_version)).encode())
    return digest.hexdigest()


# The kernels compile in two processes, each taking a fixed list of modules in a fixed order:
# numba numbers a process's functions (the `v<N>` in an entry's mangled name) as it compiles
# them, so a kernel's PTX is reproducible only if its process compiled the same things before it.
# The attention modules take about as long as all the others (25 s and 30 s on the 2-core CI
# box, against 56 s in one process).
_ATTENTION_MODULES = ("attention", "attention_tiled")
COMPILE_SHARDS = (_ATTENTION_MODULES, tuple(m for m in MODULES if m not in _ATTENTION_MODULES))
_SHARED_ARRAY = re.compile(r"\b_cudapy_smem_\d+\b")


def _name_shared_arrays(text: str, kernel: str) -> str:
    """numba names shared arrays `_cudapy_smem_N` from a per-process counter, so two processes
    give clashing names (the PTX declares them at module scope). They become
    `<kernel>_smem_<i>`, numbered in order of first appearance in the kernel's PTX."""
    names: dict[str, str] = {}
    return _SHARED_ARRAY.sub(
        lambda m: names.setdefault(m.group(0), f"{kernel}_smem_{len(names)}"), text)


def _compile_modules(modules: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Kernel -> (PTX text, mangled entry name) for the kernels of `modules`, in order, with
    each module's register caps."""
    from numba import cuda

    compiled, caps = {}, register_caps()
    for module in modules:
        for name, (function, signature) in importlib.import_module(
                f"{__package__}.{module}").KERNELS.items():
            text, _ = cuda.compile_ptx(function, signature, cc=PTX_COMPUTE_CAPABILITY,
                                       lineinfo=False)
            text = _name_shared_arrays(text, name)
            if name in caps:
                text = _cap_registers(text, caps[name])
            found = re.findall(r"\.entry\s+([\w$]+)\s*\(", text)
            assert len(found) == 1, f"{name}: expected one entry point, found {found}"
            compiled[name] = text, found[0]
    return compiled


def compile_all() -> tuple[dict[str, str], dict[str, str]]:
    """Returns (kernel -> PTX text, kernel -> mangled entry name), in kernel_table() order;
    each of COMPILE_SHARDS in a fresh process, run side by side."""
    compiled = {}
    with ProcessPoolExecutor(len(COMPILE_SHARDS),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        for shard in pool.map(_compile_modules, COMPILE_SHARDS):
            compiled.update(shard)
    names = list(kernel_table())
    assert sorted(compiled) == sorted(names), "COMPILE_SHARDS must cover MODULES"
    entries = {name: compiled[name][1] for name in names}
    assert len(set(entries.values())) == len(entries), f"entry names clash: {entries}"
    return {name: compiled[name][0] for name in names}, entries


def link_cubin(ptx: dict[str, str], arch: str) -> bytes:
    from cuda.core import Linker, LinkerOptions, ObjectCode

    if arch in DEPENDENT_LAUNCH_ARCHITECTURES:
        ptx = {name: for_sm90(text) if uses_grid_dependency(text) else text
               for name, text in ptx.items()}
    objects = [ObjectCode.from_ptx(text.encode()) for text in ptx.values()]
    return bytes(Linker(*objects, options=LinkerOptions(arch=arch)).link("cubin").code)


def build(out: Path = PREBUILT) -> dict:
    ptx, entries = compile_all()
    out.mkdir(parents=True, exist_ok=True)
    (out / "ptx").mkdir(exist_ok=True)
    for old in (out / "ptx").glob("*.ptx"):  # kernels that were renamed or removed
        if old.stem not in ptx:
            old.unlink()
    for name, text in ptx.items():
        (out / "ptx" / f"{name}.ptx").write_text(text)
    for arch in ARCHITECTURES:
        (out / f"kernels.{arch}.cubin").write_bytes(link_cubin(ptx, arch))
    # launched as dependents: the kernels that wait for their inputs (the others only let
    # theirs start early, or carry no marker)
    waiting = [name for name, text in ptx.items() if MARKER + "wait" in text]
    index = {"digest": source_digest(), "architectures": list(ARCHITECTURES),
             "ptx_compute_capability": list(PTX_COMPUTE_CAPABILITY), "entries": entries,
             "dependent_launch": {"architectures": list(DEPENDENT_LAUNCH_ARCHITECTURES),
                                  "kernels": waiting}}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def stale_reason(prebuilt: Path = PREBUILT) -> str | None:
    """Why prebuilt/ does not match the sources, or None when it does."""
    try:
        index = json.loads((prebuilt / INDEX).read_text())
    except FileNotFoundError:
        return f"{prebuilt / INDEX} is missing"
    if index.get("digest") != source_digest():
        return "kernel sources, signatures or the numba-cuda version changed since the last build"
    missing = [f"kernels.{a}.cubin" for a in ARCHITECTURES
               if not (prebuilt / f"kernels.{a}.cubin").exists()]
    missing += [f"ptx/{k}.ptx" for k in kernel_table() if not (prebuilt / "ptx" / f"{k}.ptx").exists()]
    return f"missing {missing}" if missing else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that prebuilt/ is current")
    args = parser.parse_args(argv)
    if args.check:
        reason = stale_reason()
        print(f"prebuilt kernels are stale: {reason}" if reason else "prebuilt kernels are current")
        return 1 if reason else 0
    index = build()
    print(f"built {len(index['entries'])} kernels for {', '.join(ARCHITECTURES)} + PTX "
          f"(compute {PTX_COMPUTE_CAPABILITY[0]}.{PTX_COMPUTE_CAPABILITY[1]}) into {PREBUILT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
