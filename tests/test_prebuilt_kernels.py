"""Prebuilt kernels: current with their sources, compilable for sm_75 on a CPU-only machine, and
launched with exactly the parameter list numba compiled them for."""

from __future__ import annotations

import ctypes
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np

from tests.conftest import REPO
from zse_runtime.kernels import build

PREBUILT = REPO / "zse_runtime" / "kernels" / "prebuilt"


def _real_numba_env():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": str(REPO)}
    return env


def test_prebuilt_binaries_are_current():
    result = subprocess.run([sys.executable, "-m", "zse_runtime.kernels.build", "--check"],
                            capture_output=True, text=True, env=_real_numba_env(), cwd=REPO)
    assert result.returncode == 0, (
        f"{result.stdout}{result.stderr}\nRebuild with: python -m zse_runtime.kernels.build")


def test_every_kernel_compiles_for_sm75_and_matches_the_shipped_ptx(tmp_path):
    """The real NVVM path (not the simulator), in a subprocess: PTX for compute 7.5, linked into
    sm_75 and sm_90 cubins, identical to what is shipped."""
    script = (
        "import sys, json; from pathlib import Path; from zse_runtime.kernels import build\n"
        "ptx, entries = build.compile_all()\n"
        "out = Path(sys.argv[1])\n"
        "for name, text in ptx.items(): (out / f'{name}.ptx').write_text(text)\n"
        "for arch in ('sm_75', 'sm_90'): (out / f'{arch}.cubin').write_bytes(build.link_cubin(ptx, arch))\n"
        "(out / 'entries.json').write_text(json.dumps(entries))\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                            text=True, env=_real_numba_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = json.loads((tmp_path / "entries.json").read_text())
    assert entries == json.loads((PREBUILT / "index.json").read_text())["entries"]
    for name in entries:
        fresh = (tmp_path / f"{name}.ptx").read_text()
        assert ".target sm_75" in fresh
        assert fresh == (PREBUILT / "ptx" / f"{name}.ptx").read_text(), f"{name}: stale PTX"
    for arch in ("sm_75", "sm_90"):
        assert (tmp_path / f"{arch}.cubin").read_bytes()[:4] == b"\x7fELF"


def test_shared_arrays_are_named_by_kernel_not_by_compile_order():
    """numba's counter-based names become the kernel's own, numbered by first appearance, so a
    kernel's PTX is the same whichever process compiled it and whatever it compiled before."""
    ptx = (".visible .shared .align 4 .b8 _cudapy_smem_12[16];\n"
           ".visible .shared .align 4 .b8 _cudapy_smem_120[64];\n"
           "mov.u64 %rd1, _cudapy_smem_120;\nmov.u64 %rd2, _cudapy_smem_12;\n")
    assert build._name_shared_arrays(ptx, "silu_mul") == (
        ".visible .shared .align 4 .b8 silu_mul_smem_0[16];\n"
        ".visible .shared .align 4 .b8 silu_mul_smem_1[64];\n"
        "mov.u64 %rd1, silu_mul_smem_1;\nmov.u64 %rd2, silu_mul_smem_0;\n")
    shipped = {path.stem: path.read_text() for path in (PREBUILT / "ptx").glob("*.ptx")}
    for name, text in shipped.items():
        assert "_cudapy_smem" not in text and set(re.findall(r"\b(\w+)_smem_\d+\b", text)) <= {name}


_PTX_PARAM = re.compile(r"\.param\s+\.(\w+)\s+[\w$]+_param_(\d+)")
_SIZES = {"u64": 8, "s64": 8, "b64": 8, "f64": 8, "u32": 4, "s32": 4, "b32": 4, "f32": 4}
_NUMPY = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "uint32": np.uint32,
          "uint64": np.uint64, "int64": np.int64}


def _arguments(signature: str):
    """Stand-in launch arguments for a numba signature string, as the GPU backend passes them."""
    from zse_runtime.gpu.kernels import DeviceArray  # imports no CUDA library at module level

    inner = signature[signature.index("(") + 1:signature.rindex(")")]
    args = []
    for part in re.findall(r"\w+(?:\[[^\]]*\])?", inner):
        dtype = _NUMPY[part.split("[")[0]]
        if "[" in part:
            ndim = part.count(",") + 1
            args.append(DeviceArray(0x1000, (2,) * ndim, np.dtype(dtype)))
        else:
            args.append(dtype(1))
    return args


def _value_sizes(form: str) -> list[int]:
    """Bytes of each parameter's value in a pack_arguments format (every slot is 8 bytes)."""
    return [4 if code in "iIf" else 8 for code in re.sub(r"\d+x", "", form.lstrip("<"))]


def test_launch_arguments_match_the_compiled_parameter_lists():
    from zse_runtime.gpu.kernels import MAX_PARAMETERS, pack_arguments

    index = json.loads((PREBUILT / "index.json").read_text())
    for name, (_, signature) in build.kernel_table().items():
        ptx = (PREBUILT / "ptx" / f"{name}.ptx").read_text()
        params = sorted((int(i), _SIZES[t]) for t, i in _PTX_PARAM.findall(ptx))
        assert [i for i, _ in params] == list(range(len(params))), name
        form, values = pack_arguments(_arguments(signature))
        assert _value_sizes(form) == [size for _, size in params], name
        assert len(values) == len(params) <= MAX_PARAMETERS, name
        assert struct.calcsize(form) == 8 * len(params), name
        assert index["entries"][name] in ptx


def test_launch_parameters_are_packed_one_slot_each():
    """The bytes the driver copies: a pointer per parameter, 8 bytes apart, to numba's array
    fields (meminfo, parent, nitems, itemsize, data, shape, strides in bytes) and to each
    scalar's value in the low bytes of its slot."""
    from zse_runtime.gpu.kernels import DeviceArray, ParameterBlock

    block = ParameterBlock(slots=16)
    args = (DeviceArray(0xABCD00, (3, 5), np.dtype(np.float16)), np.int32(-7), np.float32(1.5),
            np.int64(-(2**40)), np.uint64(2**63), 9, np.uint32(2**32 - 3))
    address = block.fill(args)
    pointers = (ctypes.c_void_p * 15).from_address(address)
    base = ctypes.addressof(block.slots)
    assert [pointers[i] for i in range(15)] == [base + 8 * i for i in range(15)]
    raw = bytes(block.slots)[:8 * 15]
    assert struct.unpack_from("<QQqqQqqqq", raw, 0) == (0, 0, 15, 2, 0xABCD00, 3, 5, 10, 2)
    assert struct.unpack_from("<i", raw, 72) == (-7,)
    assert struct.unpack_from("<f", raw, 80) == (1.5,)
    assert struct.unpack_from("<q", raw, 88) == (-(2**40),)
    assert struct.unpack_from("<Q", raw, 96) == (2**63,)
    assert struct.unpack_from("<q", raw, 104) == (9,)  # a Python int goes as int64
    assert struct.unpack_from("<I", raw, 112) == (2**32 - 3,)  # the INT4 GEMV's group argument
    # a second launch reuses the block: its values replace the first's
    assert block.fill((DeviceArray(0x10, (4,), np.dtype(np.int32)),)) == address
    assert struct.unpack_from("<QQqqQqq", bytes(block.slots), 0) == (0, 0, 4, 4, 0x10, 4, 4)


def test_every_gemv_the_backend_plans_is_shipped():
    """For every decode batch size and the 7B shapes plus a tiny model's, the GPU backend's GEMV
    choice names a prebuilt kernel, and one launch's token tiles cover the batch."""
    from zse_runtime.gpu.backend import DECODE_BUCKETS, gemv_token_tile, int4_gemv_plan

    entries = json.loads((build.PREBUILT / build.INDEX).read_text())["entries"]
    shapes = ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (152064, 3584), (64, 32))
    for tokens in range(1, DECODE_BUCKETS[-1] + 1):
        tile = gemv_token_tile(tokens)
        assert f"fp16_matmul_t{tile}" in entries
        for rows, cols in shapes:
            kernel, block_rows, plan_tile, threads = int4_gemv_plan(rows, cols, tokens)
            assert kernel in entries and plan_tile == tile and threads % 32 == 0
            assert kernel.endswith(f"_r{block_rows}")
            # warps split K: the same block size at every batch keeps batched == solo
            assert threads == int4_gemv_plan(rows, cols, 1)[3]


EIATTR_FRAME_SIZE = 0x11
EIATTR_REGCOUNT = 0x2F


def _function_attribute(cubin: bytes, attribute: int) -> dict[str, int]:
    """Function name -> value of a per-function attribute (EIATTR_FRAME_SIZE: stack frame
    bytes) in a cubin's .nv.info section, whose entries hold the function's symbol index and
    the value."""
    import struct

    section_table, = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, section_table + i * entry_size)
                for i in range(count)]
    text = lambda base, offset: cubin[base + offset:cubin.index(b"\0", base + offset)].decode()
    by_name = {text(sections[names_index][4], s[0]): s for s in sections}
    symbols, strings = by_name[".symtab"], sections[by_name[".symtab"][6]]
    names = [text(strings[4], struct.unpack_from("<I", cubin, symbols[4] + 24 * i)[0])
             for i in range(symbols[5] // 24)]
    info = by_name[".nv.info"]
    values, offset = {}, info[4]
    while offset < info[4] + info[5]:
        form, kind, size = struct.unpack_from("<BBH", cubin, offset)
        if form == 4 and kind == attribute:
            symbol, value = struct.unpack_from("<II", cubin, offset + 4)
            values[names[symbol]] = value
        offset += 4 + (size if form == 4 else 0)
    return values


def test_no_kernel_has_a_stack_frame():
    """GpuOps sets the context's stack to what the kernels use (KernelLibrary.local_bytes),
    which saves CUDA's default reservation of 1 KiB per resident thread (264 MiB measured on an
    H200) only while every kernel's frame is empty: a kernel that spilled or called a function
    through the ABI would take it back at its first launch."""
    entries = json.loads((PREBUILT / "index.json").read_text())["entries"]
    for arch in build.ARCHITECTURES:
        frames = _function_attribute((PREBUILT / f"kernels.{arch}.cubin").read_bytes(),
                                     EIATTR_FRAME_SIZE)
        assert set(entries.values()) <= set(frames), arch
        assert {name: size for name, size in frames.items() if size} == {}, arch



def test_register_caps_reach_the_binaries():
    """A kernel with a register budget (MAX_REGISTERS) carries `.maxnreg` in its PTX, and ptxas
    kept to it in every cubin, without a stack frame (test above)."""
    entries = json.loads((PREBUILT / "index.json").read_text())["entries"]
    caps = build.register_caps()
    assert caps == {"int4_gemv_t1_r4": 72, "int4_gemv_t1_r8": 96}
    for name, cap in caps.items():
        assert f".maxnreg {cap}\n" in (PREBUILT / "ptx" / f"{name}.ptx").read_text()
    for arch in build.ARCHITECTURES:
        registers = _function_attribute((PREBUILT / f"kernels.{arch}.cubin").read_bytes(),
                                        EIATTR_REGCOUNT)
        for name, cap in caps.items():
            assert 0 < registers[entries[name]] <= cap, (arch, name, registers[entries[name]])
        # the 8-row kernel uses its budget (ptxas alone chose 72 and interleaved the loads)
        assert registers[entries["int4_gemv_t1_r8"]] > 80, arch
