"""Prebuilt kernels (zse_runtime/kernels/prebuilt) and typed launches in numba's kernel ABI."""

from __future__ import annotations

import ctypes
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import driver

log = logging.getLogger("zse")
PREBUILT = Path(__file__).resolve().parent.parent / "kernels" / "prebuilt"

_SCALAR_TYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.float32): ctypes.c_float,
                 np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64}


@dataclass(frozen=True)
class DeviceArray:
    """A C-contiguous array in device memory: a pointer, a shape and a dtype."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def rows(self, count: int) -> "DeviceArray":
        """The first `count` rows (a view)."""
        return DeviceArray(self.pointer, (count, *self.shape[1:]), self.dtype)

    def reshape(self, *shape: int) -> "DeviceArray":
        assert np.prod(shape) == np.prod(self.shape), (shape, self.shape)
        return DeviceArray(self.pointer, tuple(shape), self.dtype)

    def abi(self) -> tuple[list, list]:
        """numba's lowering of an array argument: meminfo, parent, nitems, itemsize, data,
        shape[ndim], strides[ndim] (bytes)."""
        strides, step = [], self.dtype.itemsize
        for extent in reversed(self.shape):
            strides.insert(0, step)
            step *= extent
        values = [0, 0, int(np.prod(self.shape, dtype=np.int64)), self.dtype.itemsize, self.pointer,
                  *self.shape, *strides]
        types = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                 *[ctypes.c_int64] * (2 * len(self.shape))]
        return values, types


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

    def __init__(self, compute_capability: tuple[int, int], prebuilt: Path = PREBUILT):
        index = json.loads((prebuilt / "index.json").read_text())
        arch = f"sm_{compute_capability[0]}{compute_capability[1]}"
        cubin = prebuilt / f"kernels.{arch}.cubin"
        self.entries: dict[str, str] = index["entries"]
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

    def launch(self, name: str, grid, block: int, stream: driver.Stream, *args) -> None:
        grid = (grid, 1, 1) if isinstance(grid, int) else (*grid, *(1,) * (3 - len(grid)))
        values, types = [], []
        for arg in args:
            if isinstance(arg, DeviceArray):
                v, t = arg.abi()
                values += v
                types += t
            else:
                scalar = np.asarray(arg)
                values.append(scalar.item())
                types.append(_SCALAR_TYPES[scalar.dtype])
        driver.launch(self.functions[name], grid, block, 0, stream, tuple(values), tuple(types))
