"""Programmatic dependent launch (kernels/grid_dependency.py), checked without a GPU: which kernels
wait and which let their dependents start, what the sm_90 cubin's PTX carries against the
compute 7.5 PTX, and which launches the kernel library sends through cuLaunchKernelEx. That the
launches compute the same numbers as serial ones is scripts/gpu_check.py's "dependent launch"
check (bit for bit, on the device)."""

from __future__ import annotations

import json

import pytest

from zse_runtime.gpu import kernels as gpu_kernels
from zse_runtime.kernels import build
from zse_runtime.kernels.grid_dependency import MARKER, for_sm90, uses_grid_dependency

PREBUILT = build.PREBUILT
INDEX = json.loads((PREBUILT / build.INDEX).read_text())
GEMVS = {"int4_gemv_t1_r4", "int4_gemv_t4_r4", "int4_gemv_t8_r4", "int4_gemv_t1_r8"}
# a decode layer's other kernels, which wait at entry
ELEMENTWISE = {"add_rmsnorm", "rope_and_cache", "attention_decode", "attention_decode_grouped",
               "silu_mul"}
WAITING = GEMVS | ELEMENTWISE
# who lets the next kernel in early: every waiting kernel, and the one producer of GEMV digits
# that is not launched as a dependent (the lm_head's input)
TRIGGERING = WAITING | {"quantize_activations", "attention_combine"}


def _ptx(name: str) -> str:
    return (PREBUILT / "ptx" / f"{name}.ptx").read_text()


def test_the_decode_layer_kernels_wait_and_let_the_next_one_start():
    entries = list(INDEX["entries"])
    assert INDEX["dependent_launch"] == {"architectures": ["sm_90"],
                                         "kernels": sorted(WAITING, key=entries.index)}
    for name in entries:
        text = _ptx(name)
        assert (MARKER + "wait" in text) == (name in WAITING), name
        assert (MARKER + "launch_dependents" in text) == (name in TRIGGERING), name
        assert "griddepcontrol" not in text.replace(MARKER, ""), f"{name}: 7.5 PTX instruction"
        assert ".target sm_75" in text


def test_the_sm90_ptx_turns_the_markers_into_instructions():
    for name in TRIGGERING:
        text = for_sm90(_ptx(name))
        assert ".target sm_90" in text and ".target sm_75" not in text
        assert MARKER not in text
        assert text.count("griddepcontrol.launch_dependents;") == 1, name
        # once: a GEMV tile's other loop shape is folded away at compile time
        assert text.count("griddepcontrol.wait;") == (1 if name in WAITING else 0), name
    plain = _ptx("embed_int4")
    assert not uses_grid_dependency(plain)
    with pytest.raises(AssertionError, match="unknown griddepcontrol marker"):
        for_sm90(plain + MARKER + "launch\n")
    with pytest.raises(AssertionError, match="older than 7.8"):
        for_sm90(plain.replace(".version 8.8", ".version 7.0"))


class _FakeModule:
    def __init__(self, image):
        pass

    def function(self, entry):
        return entry


@pytest.mark.parametrize("arch, enabled, driver_version, expect", [
    ((9, 0), True, 12030, WAITING), ((9, 0), True, 13000, WAITING), ((9, 0), False, 13000, set()),
    ((9, 0), True, 12020, set()), ((7, 5), True, 13000, set()), ((8, 9), True, 13000, set())])
def test_the_library_launches_waiting_kernels_as_dependents_on_sm90_only(
        monkeypatch, arch, enabled, driver_version, expect):
    """...and with a driver that captures programmatic launches in graphs (CUDA 12.3+)."""
    calls = []
    monkeypatch.setattr(gpu_kernels.driver, "driver_version", lambda: driver_version)
    monkeypatch.setattr(gpu_kernels.driver, "Module", _FakeModule)
    monkeypatch.setattr(gpu_kernels.driver, "local_bytes", lambda function: 0)
    monkeypatch.setattr(gpu_kernels.driver, "launch",
                        lambda function, *rest: calls.append(("serial", function)))

    class FakeDependentLaunch:
        def launch(self, function, *rest):
            calls.append(("dependent", function))

    monkeypatch.setattr(gpu_kernels.driver, "DependentLaunch", FakeDependentLaunch)
    library = gpu_kernels.KernelLibrary(arch, dependent_launch=enabled)
    assert library.dependents == frozenset(expect)
    names = ("int4_gemv_t1_r4", "int4_gemv_t1_r8", "add_rmsnorm", "embed_int4", "int4_gemm")
    for name in names:
        library.launch(name, 1, 32, None)
    entries = INDEX["entries"]
    assert calls == [("dependent" if name in expect else "serial", entries[name])
                     for name in names]
