"""A block scheduler for numba's CUDA simulator: a block's threads as greenlets, not OS threads.

The simulator runs each CUDA thread of a block as a Python thread and finds threads blocked in
syncthreads() by polling them. On the 2-core CI box that cost most of the kernel tests' time:
first the poll itself (300 million `Thread.is_alive` calls in one GEMV test), then, with the
poll replaced by a condition variable, the hand-offs of the GIL: at every barrier each of a
block's 128 threads is woken by the OS and waits for the GIL in turn (the GIL sat idle ~40% of
the time), and the warp helpers of kernels/common.py put two barriers behind every warp sum.
Here a block's threads are greenlets on the launching thread: each runs until it reaches a
barrier (a switch back to the block's loop) or returns, and a barrier opens when every thread
still running has reached it. That is the simulator's semantics with no OS scheduling at all,
in a deterministic order: ascending thread index up to the first barrier, descending up to the
next, and so on, so that a value read from another thread without a barrier between the write
and the read is stale in one of the two directions. An exception in one thread ends the launch
with the simulator's message (its thread and block indices).

The simulator also finds a block's shared arrays by their call site, which it reads from a full
`traceback.extract_stack` per call: every thread of every block formats the whole stack (pytest's
frames included) and stats its files through linecache, ~40% of the CPU time of an attention
test. `_shared_array_by_call_site` keys the same (file, line) from the caller's frame directly.
And every call of a device function swaps its module's `cuda` for the fake module under a
per-module lock, twice per call. Here a launch swaps every device function's module once for
the whole launch (the simulator runs one launch at a time), and device calls inside it go
straight to the function.

`install()` patches numba_cuda's simulator in place (conftest.py calls it before any test).
"""

from __future__ import annotations

import sys
import threading
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import numpy as np
from greenlet import greenlet
from numba.cuda.simulator import kernel as sim
from numba.cuda.simulator import kernelapi


class _SimulatedThread:
    """One CUDA thread of the block being run: what the fake cuda module reads through
    `threading.current_thread()` (its indices) and calls for barriers."""

    def __init__(self, manager, block_loop, block_index, thread_index):
        self._manager = manager
        self._block_loop = block_loop  # the greenlet running the block (_run)
        self.blockIdx = kernelapi.Dim3(*block_index)
        self.threadIdx = kernelapi.Dim3(*thread_index)
        x, y, _ = manager._block_dim
        self.thread_id = self.threadIdx.x + x * (self.threadIdx.y + y * self.threadIdx.z)

    def syncthreads(self):
        self._block_loop.switch()  # back to _run; resumed when the barrier opens

    # the simulator's own reductions over a barrier (manager.block_state, two syncthreads)
    syncthreads_count = sim.BlockThread.syncthreads_count
    syncthreads_and = sim.BlockThread.syncthreads_and
    syncthreads_or = sim.BlockThread.syncthreads_or


_running: _SimulatedThread | None = None  # the simulated thread whose greenlet runs now


class _ThreadingForKernelApi:
    """kernelapi's `threading`: `current_thread()` is the simulated thread running now."""

    def __getattr__(self, name):
        return getattr(threading, name)

    @staticmethod
    def current_thread():
        return _running if _running is not None else threading.current_thread()


def _run(self, grid_point, *args):
    """BlockManager.run: every thread of the block to its next barrier (or its end), in
    alternating thread order, until none is left."""
    global _running
    loop = greenlet.getcurrent()
    debug = self._debug

    def body():
        if debug:  # as the simulator's debug mode: division by zero raises
            np.seterr(divide="raise")
        self._f(*args)

    waiting = []
    for block_point in np.ndindex(*self._block_dim):
        thread = _SimulatedThread(self, loop, grid_point, block_point)
        waiting.append((thread, greenlet(body)))
    try:
        while waiting:
            still_running = []
            for thread, task in waiting:
                _running = thread
                try:
                    task.switch()
                except Exception as error:
                    tid, ctaid = list(thread.threadIdx), list(thread.blockIdx)
                    message = f"tid={tid} ctaid={ctaid}" + (f": {error}" if str(error) else "")
                    raise type(error)(message).with_traceback(error.__traceback__) from None
                if not task.dead:  # it waits at a barrier
                    still_running.append((thread, task))
            waiting = still_running[::-1]  # the other order up to the next barrier
    finally:
        _running = None


_shared_array = kernelapi.FakeCUDAShared.array


def _shared_array_by_call_site(self, shape, dtype, alignment=None):
    if alignment is not None or shape == 0:  # the simulator's own handling (an error; dynamic)
        return _shared_array(self, shape, dtype, alignment)
    if isinstance(dtype, kernelapi.types.Type):
        dtype = kernelapi.numpy_support.as_dtype(dtype)
    caller = sys._getframe(1)
    site = (caller.f_code.co_filename, caller.f_lineno)  # the simulator's key, without the stack
    array = self._allocations.get(site)
    if array is None:
        array = self._allocations[site] = np.empty(shape, dtype)
    return array


# the module globals of every device function the simulator has wrapped (by id), and the ids of
# those swapped to the fake cuda module for the launch running now
_device_globals: dict[int, dict] = {}
_swapped_for_launch: set[int] = set()
_kernel_init = sim.FakeCUDAKernel.__init__
_kernel_call = sim.FakeCUDAKernel.__call__
_push_kernel_context = sim._push_kernel_context


def _init_recording_device_modules(self, fn, device, *args, **kwargs):
    _kernel_init(self, fn, device, *args, **kwargs)
    if device:
        _device_globals.setdefault(id(fn.__globals__), fn.__globals__)


def _call_without_swapping(self, *args):
    if self._device and id(self.fn.__globals__) in _swapped_for_launch:
        return self.fn(*args)  # its module already sees the fake cuda for this launch
    return _kernel_call(self, *args)


@contextmanager
def _push_swapping_device_modules(fake_cuda):
    with _push_kernel_context(fake_cuda), ExitStack() as swaps:
        for key, module_globals in list(_device_globals.items()):
            swaps.enter_context(kernelapi.swapped_cuda_module(
                SimpleNamespace(__globals__=module_globals), fake_cuda))
            _swapped_for_launch.add(key)
        try:
            yield
        finally:
            _swapped_for_launch.clear()  # before the swaps are undone


def install() -> None:
    sim.FakeCUDAKernel.__init__ = _init_recording_device_modules
    sim.FakeCUDAKernel.__call__ = _call_without_swapping
    sim._push_kernel_context = _push_swapping_device_modules
    kernelapi.FakeCUDAShared.array = _shared_array_by_call_site
    sim.BlockManager.run = _run
    kernelapi.threading = _ThreadingForKernelApi()
