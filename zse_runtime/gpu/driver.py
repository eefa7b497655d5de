"""The slice of the CUDA driver API the runtime uses, through cuda.bindings (no numba, no NVVM).

Every call's status is checked; failures raise CudaError naming the call.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
from cuda.bindings import driver as cu


class CudaError(RuntimeError):
    pass


def check(result, call: str = "CUDA call"):
    """Unwrap cuda.bindings' (status, *values) tuples."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if status != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(status)
        raise CudaError(f"{call} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceInfo:
    ordinal: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    multiprocessors: int


def device_count() -> int:
    """Number of CUDA devices; 0 where there is no driver or no device."""
    try:
        check(cu.cuInit(0), "cuInit")
        return check(cu.cuDeviceGetCount(), "cuDeviceGetCount")
    except CudaError:
        return 0


def driver_version() -> int:
    """The CUDA driver's version, 1000 * major + 10 * minor (12030 for 12.3)."""
    return check(cu.cuDriverGetVersion(), "cuDriverGetVersion")


class Context:
    """The device's primary context, made current on the calling thread."""

    def __init__(self, ordinal: int = 0):
        check(cu.cuInit(0), "cuInit")
        self.device = check(cu.cuDeviceGet(ordinal), "cuDeviceGet")
        self.context = check(cu.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        self.make_current()
        attribute = lambda a: check(cu.cuDeviceGetAttribute(a, self.device), "cuDeviceGetAttribute")
        name = check(cu.cuDeviceGetName(256, self.device), "cuDeviceGetName")
        self.info = DeviceInfo(
            ordinal,
            name.split(b"\0")[0].decode(),
            (attribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
             attribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)),
            check(cu.cuDeviceTotalMem(self.device), "cuDeviceTotalMem"),
            attribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        )

    def make_current(self) -> None:
        check(cu.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def set_stack_size(self, nbytes: int) -> None:
        """Per-thread stack of the context's kernels. The driver reserves it for every thread
        the GPU can hold resident: CUDA's default of 1 KiB is 264 MiB on an H200 (132 SMs x
        2048 threads), measured with cuMemGetInfo. A launch that needs more grows it."""
        check(cu.cuCtxSetLimit(cu.CUlimit.CU_LIMIT_STACK_SIZE, nbytes), "cuCtxSetLimit")

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes."""
        return check(cu.cuMemGetInfo(), "cuMemGetInfo")


def allocate(nbytes: int) -> int:
    return int(check(cu.cuMemAlloc(max(nbytes, 1)), f"cuMemAlloc({nbytes})"))


def free(pointer: int) -> None:
    check(cu.cuMemFree(pointer), "cuMemFree")


class PinnedBuffer:
    """Page-locked host memory (async copies from it overlap with the CPU), as a numpy view.
    `mapped`: kernels may also read it in place, at `device_pointer(pointer)`."""

    def __init__(self, nbytes: int, mapped: bool = False):
        self.nbytes = nbytes
        flags = cu.CU_MEMHOSTALLOC_DEVICEMAP if mapped else 0
        self.pointer = int(check(cu.cuMemHostAlloc(max(nbytes, 1), flags),
                                 f"cuMemHostAlloc({nbytes})"))
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(
            self.pointer))[:nbytes]

    def close(self) -> None:
        if self.pointer:
            check(cu.cuMemFreeHost(self.pointer), "cuMemFreeHost")
            self.pointer = 0


def register_host(pointer: int, nbytes: int) -> None:
    """Page-lock existing host memory (a file's memory map included) for the device to read in
    place; the pages are read in (from disk, if not cached) first."""
    flags = cu.CU_MEMHOSTREGISTER_DEVICEMAP | cu.CU_MEMHOSTREGISTER_READ_ONLY
    check(cu.cuMemHostRegister(pointer, nbytes, flags), "cuMemHostRegister")


def unregister_host(pointer: int) -> None:
    check(cu.cuMemHostUnregister(pointer), "cuMemHostUnregister")


def device_pointer(host_pointer: int) -> int:
    """The device's address of registered or mapped-pinned host memory (the same number where
    the platform has unified addressing, which is every 64-bit Linux CUDA platform)."""
    return int(check(cu.cuMemHostGetDevicePointer(host_pointer, 0), "cuMemHostGetDevicePointer"))


class Stream:
    def __init__(self):
        self.handle = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING),
                            "cuStreamCreate")

    def synchronize(self) -> None:
        check(cu.cuStreamSynchronize(self.handle), "cuStreamSynchronize")

    def copy_to_device(self, device_pointer: int, host_pointer: int, nbytes: int) -> None:
        check(cu.cuMemcpyHtoDAsync(device_pointer, host_pointer, nbytes, self.handle),
              "cuMemcpyHtoDAsync")

    def copy_to_host(self, host_pointer: int, device_pointer: int, nbytes: int) -> None:
        check(cu.cuMemcpyDtoHAsync(host_pointer, device_pointer, nbytes, self.handle),
              "cuMemcpyDtoHAsync")

    def begin_capture(self) -> None:
        check(cu.cuStreamBeginCapture(
            self.handle, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
            "cuStreamBeginCapture")

    def end_capture(self) -> "Graph":
        graph = check(cu.cuStreamEndCapture(self.handle), "cuStreamEndCapture")
        return Graph(graph)


class Graph:
    """An instantiated CUDA graph: one cuGraphLaunch replays every captured launch and copy."""

    def __init__(self, graph):
        self.graph = graph
        self.executable = check(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def launch(self, stream: Stream) -> None:
        check(cu.cuGraphLaunch(self.executable, stream.handle), "cuGraphLaunch")


class Event:
    def __init__(self, timing: bool = True):
        flags = cu.CUevent_flags.CU_EVENT_DEFAULT if timing else \
            cu.CUevent_flags.CU_EVENT_DISABLE_TIMING  # a sync point only: cheaper to record
        self.handle = check(cu.cuEventCreate(flags), "cuEventCreate")

    def record(self, stream: Stream) -> None:
        check(cu.cuEventRecord(self.handle, stream.handle), "cuEventRecord")

    def synchronize(self) -> None:
        check(cu.cuEventSynchronize(self.handle), "cuEventSynchronize")

    def elapsed_ms(self, start: "Event") -> float:
        elapsed = getattr(cu, "cuEventElapsedTime_v2", None) or cu.cuEventElapsedTime  # CUDA 13 name
        return check(elapsed(start.handle, self.handle), "cuEventElapsedTime")


class Module:
    """A loaded cubin or PTX image and its kernels by entry name."""

    def __init__(self, image: bytes):
        buffer = np.frombuffer(image, np.uint8)
        self.handle = check(cu.cuModuleLoadData(buffer.ctypes.data), "cuModuleLoadData")

    def function(self, entry: str):
        return check(cu.cuModuleGetFunction(self.handle, entry.encode()), f"cuModuleGetFunction({entry})")


def local_bytes(function) -> int:
    """Local memory per thread (stack frame and spills) that a kernel needs."""
    attribute = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
    return check(cu.cuFuncGetAttribute(attribute, function), "cuFuncGetAttribute")


def launch(function, grid: tuple[int, int, int], block: int, shared_bytes: int, stream: Stream,
           parameters: int) -> None:
    """parameters: the address of an array of pointers to the kernel's parameter values."""
    check(cu.cuLaunchKernel(function, *grid, block, 1, 1, shared_bytes, stream.handle,
                            parameters, 0), "cuLaunchKernel")


# A captured programmatic launch becomes a graph edge from the kernel's programmatic port
# (CUgraphEdgeData, driver API of CUDA 12.3): with an older driver the kernels launch serially
# rather than depend on how it captures them.
DEPENDENT_LAUNCH_MIN_DRIVER = 12030


class DependentLaunch:
    """Launches that may begin before the previous kernel in the stream ends (programmatic
    dependent launch, sm_90+; kernels/grid_dependency.py): the kernel waits for its inputs
    itself. One reusable launch configuration per launching thread."""

    def __init__(self):
        attribute = cu.CUlaunchAttribute()
        attribute.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attribute.value.programmaticStreamSerializationAllowed = 1
        self.config = cu.CUlaunchConfig()
        self.config.attrs = [attribute]
        self.config.numAttrs = 1
        self.config.blockDimY = self.config.blockDimZ = 1

    def launch(self, function, grid: tuple[int, int, int], block: int, shared_bytes: int,
               stream: Stream, parameters: int) -> None:
        config = self.config
        config.gridDimX, config.gridDimY, config.gridDimZ = grid
        config.blockDimX = block
        config.sharedMemBytes = shared_bytes
        config.hStream = stream.handle
        check(cu.cuLaunchKernelEx(config, function, parameters, 0), "cuLaunchKernelEx")
