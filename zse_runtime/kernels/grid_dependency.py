"""Programmatic dependent launch (sm_90+): a kernel may start before the one ahead of it ends.

In a decode step's graph every kernel waits for the previous one, and on the H200 a short
kernel's launch, ramp and tail cost about as much as its body (docs/kernel-notes.md). A kernel
launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may become resident as soon
as every block of the kernel ahead has executed `griddepcontrol.launch_dependents` (or exited);
it then waits in `griddepcontrol.wait` until that grid has completed and its memory is visible.

The rule that keeps this correct: before its wait, a dependent reads nothing another kernel
writes and writes nothing. The INT4 GEMVs load their first weights (constant) before the wait,
so those loads overlap the kernel that writes x; the per-layer elementwise kernels, the decode
attention and the norms wait at entry. Who lets dependents in early: the producers of a GEMV's
input (the norm, the attention, silu_mul, quantize_activations) and rope_and_cache at entry, so
the next kernel's blocks load while they run; the GEMVs after their K loop, before the blocks'
reductions (at entry they would take SM slots their own later blocks need). Since each kernel
ends only after its wait, and each wait follows the completion of the kernel ahead, completion
stays transitive down the stream.

Neither instruction exists before sm_90, and the prebuilt PTX targets compute 7.5 (the T4). So
both are emitted as PTX comments, `// zse:griddepcontrol.wait` and
`// zse:griddepcontrol.launch_dependents`, which ptxas ignores; build.py turns them into the
instructions for the sm_90 cubin only (`for_sm90`). Each is also a compiler barrier (a volatile
asm that clobbers memory), so NVVM keeps every load of the inputs after the wait in both PTX
variants. Launched without the attribute (other GPUs, ZSE_DEPENDENT_LAUNCH=0, the simulator
where both are no-ops), the wait returns at once: the kernels are correct however launched.
"""

from __future__ import annotations

import re

from numba import config, cuda

MARKER = "// zse:griddepcontrol."
_INSTRUCTIONS = ("wait", "launch_dependents")
_TARGET = re.compile(r"^\.target sm_\d+$", re.MULTILINE)
_VERSION = re.compile(r"^\.version (\d+)\.(\d+)$", re.MULTILINE)

if config.ENABLE_CUDASIM:

    @cuda.jit(device=True, inline="always")
    def wait_for_prerequisite_grids():
        pass

    @cuda.jit(device=True, inline="always")
    def launch_dependents():
        pass

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def _marker(instruction: str):
        @intrinsic
        def emit(typingctx):
            def codegen(context, builder, sig, args):
                asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), MARKER + instruction,
                                   "~{memory}", side_effect=True)
                builder.call(asm, [])
                return context.get_dummy_value()

            return types.void(), codegen

        return emit

    _wait = _marker("wait")
    _launch_dependents = _marker("launch_dependents")

    @cuda.jit(device=True, inline="always")
    def wait_for_prerequisite_grids():
        _wait()

    @cuda.jit(device=True, inline="always")
    def launch_dependents():
        _launch_dependents()


@cuda.jit(device=True, inline="always")
def enter_as_dependent():
    """The entry of a kernel that reads its inputs only after it: the next kernel may become
    resident now, and this one waits for the kernel ahead of it."""
    launch_dependents()
    wait_for_prerequisite_grids()


def uses_grid_dependency(ptx: str) -> bool:
    """Whether a kernel's PTX carries either marker."""
    return MARKER in ptx


def for_sm90(ptx: str) -> str:
    """The PTX with its markers as instructions and its target raised to sm_90 (PTX for an older
    target is valid for a newer one; griddepcontrol needs .target sm_90 and ISA 7.8, which the
    CUDA 12 toolchain's PTX already declares: 8.8 for numba-cuda 0.30)."""
    for instruction in _INSTRUCTIONS:
        ptx = ptx.replace(MARKER + instruction, f"griddepcontrol.{instruction};")
    assert MARKER not in ptx, "an unknown griddepcontrol marker"
    version = _VERSION.search(ptx)
    assert version and (int(version[1]), int(version[2])) >= (7, 8), "PTX ISA older than 7.8"
    ptx, found = _TARGET.subn(".target sm_90", ptx, count=1)
    assert found == 1, "no .target line in the PTX"
    return ptx
