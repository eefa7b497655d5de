"""Prebuilt kernels (zse_runtime/kernels/prebuilt) and typed launches in numba's kernel ABI."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import driver

log = logging.getLogger("zse")
PREBUILT = Path(__file__).resolve().parent.parent / "kernels" / "prebuilt"

# Launch parameters go to the driver as an array of pointers, one per parameter, each to an
# 8-byte slot of one reusable block: struct formats per parameter, a 4-byte value in the low
# half of its slot (the driver copies each parameter's own size, from the kernel image).
_SCALAR_FORMATS = {np.int32: "i4x", np.uint32: "I4x", np.float32: "f4x", np.int64: "q",
                   np.uint64: "Q"}
# numba's lowering of an array argument: meminfo, parent, nitems, itemsize, data, shape[ndim],
# strides[ndim] (bytes), every field 8 bytes
_ARRAY_FORMATS = {ndim: "QQqqQ" + "q" * (2 * ndim) for ndim in range(1, 5)}
MAX_PARAMETERS = 128


@dataclass(frozen=True)
class DeviceArray:
    """A C-contiguous array in device memory: a pointer, a shape and a dtype."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def rows(self, count: int) -> "DeviceArray":
        """The first `count` rows (a view)."""
        return DeviceArray(self.pointer, (count, *self.shape[1:]), self.dtype)

    def reshape(self, *shape: int) -> "DeviceArray":
        assert math.prod(shape) == math.prod(self.shape), (shape, self.shape)
        return DeviceArray(self.pointer, tuple(shape), self.dtype)

    def abi(self) -> tuple[str, tuple]:
        """(struct format, values) of numba's lowering of this array as kernel parameters."""
        itemsize = self.dtype.itemsize
        strides, step = [], itemsize  # C order: the last dimension's stride is the item's size
        for extent in reversed(self.shape):
            strides.append(step)
            step *= extent
        return (_ARRAY_FORMATS[len(self.shape)],
                (0, 0, step // itemsize, itemsize, self.pointer, *self.shape, *reversed(strides)))


def pack_arguments(args) -> tuple[str, tuple]:
    """(struct format, values) of a kernel's arguments in numba's ABI: DeviceArrays and numpy
    scalars (np.int32, np.float32, np.int64, np.uint64), one 8-byte slot per parameter."""
    formats, values = [], []
    for arg in args:
        if isinstance(arg, DeviceArray):
            form, fields = arg.abi()
            formats.append(form)
            values += fields
        else:
            # numpy scalars as they are; anything else as numpy sees it (a Python int: int64)
            scalar = arg if type(arg) in _SCALAR_FORMATS else np.asarray(arg)[()]
            formats.append(_SCALAR_FORMATS[type(scalar)])
            values.append(scalar.item())
    return "<" + "".join(formats), tuple(values)


class ParameterBlock:
    """The launch parameters' host memory, reused by every launch on one thread: the driver
    copies them before cuLaunchKernel returns (into the graph node, while capturing). One
    struct call packs them; the bindings' (values, ctypes types) form built a ctypes object
    per argument, most of a short prefill's host time (docs/benchmarks.md)."""

    def __init__(self, slots: int = MAX_PARAMETERS):
        self.slots = (ctypes.c_uint64 * slots)()
        base = ctypes.addressof(self.slots)
        self.pointers = (ctypes.c_void_p * slots)(*(base + 8 * i for i in range(slots)))
        self.address = ctypes.addressof(self.pointers)

    def fill(self, args) -> int:
        """Pack `args` into the block; returns the address of its pointer array."""
        form, values = pack_arguments(args)
        struct.pack_into(form, self.slots, 0, *values)
        return self.address


def download(stream: driver.Stream, array: DeviceArray) -> np.ndarray:
    """Synchronous device -> host copy through a pinned buffer (checks and tests, not serving)."""
    staging = driver.PinnedBuffer(array.nbytes)
    try:
        stream.copy_to_host(staging.pointer, array.pointer, array.nbytes)
        stream.synchronize()
        return staging.array.view(array.dtype).reshape(array.shape).copy()
    finally:
        staging.close()


def upload(stream: driver.Stream, pointer: int, values: np.ndarray) -> None:
    """Synchronous host -> device copy of a whole array through a pinned buffer."""
    values = np.ascontiguousarray(values)
    staging = driver.PinnedBuffer(values.nbytes)
    try:
        staging.array[:] = values.view(np.uint8).reshape(-1)
        stream.copy_to_device(pointer, staging.pointer, values.nbytes)
        stream.synchronize()
    finally:
        staging.close()


class KernelLibrary:
    """All kernels for one GPU: the cubin built for its architecture, else the PTX (driver JIT)."""

    def __init__(self, compute_capability: tuple[int, int], prebuilt: Path = PREBUILT,
                 dependent_launch: bool = True):
        index = json.loads((prebuilt / "index.json").read_text())
        arch = f"sm_{compute_capability[0]}{compute_capability[1]}"
        cubin = prebuilt / f"kernels.{arch}.cubin"
        self.entries: dict[str, str] = index["entries"]
        # kernels that wait for their inputs themselves in this architecture's cubin, launched
        # so that they may start before the kernel ahead of them ends (grid_dependency.py)
        dependents = index.get("dependent_launch", {})
        self.dependents: frozenset[str] = frozenset(
            dependents.get("kernels", []) if dependent_launch and cubin.exists()
            and arch in dependents.get("architectures", [])
            and driver.driver_version() >= driver.DEPENDENT_LAUNCH_MIN_DRIVER else [])
        if cubin.exists():
            module = driver.Module(cubin.read_bytes())
            self.source = f"prebuilt cubin {cubin.name}"
            self.functions = {name: module.function(entry) for name, entry in self.entries.items()}
        else:
            # No binary for this architecture: the driver compiles the PTX (~0.1 s per kernel).
            self.source = (f"PTX (compute {index['ptx_compute_capability']}) JIT-compiled by the "
                           f"driver: no prebuilt cubin for {arch}")
            log.warning("kernels: %s", self.source)
            self.functions = {
                name: driver.Module((prebuilt / "ptx" / f"{name}.ptx").read_bytes() + b"\0").function(entry)
                for name, entry in self.entries.items()}
        self.local_bytes = max(driver.local_bytes(f) for f in self.functions.values())
        self._per_thread = threading.local()  # a ParameterBlock and DependentLaunch each

    def launch(self, name: str, grid, block: int, stream: driver.Stream, *args) -> None:
        grid = (grid, 1, 1) if isinstance(grid, int) else (*grid, *(1,) * (3 - len(grid)))
        mine = self._per_thread
        if not hasattr(mine, "parameters"):
            mine.parameters = ParameterBlock()
            mine.dependent = driver.DependentLaunch() if self.dependents else None
        parameters = mine.parameters.fill(args)
        if name in self.dependents:
            mine.dependent.launch(self.functions[name], grid, block, 0, stream, parameters)
        else:
            driver.launch(self.functions[name], grid, block, 0, stream, parameters)
