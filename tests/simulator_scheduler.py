"""A block scheduler for numba's CUDA simulator that waits instead of polling.

The simulator runs each CUDA thread of a block as a Python thread, and its BlockManager finds
threads blocked in syncthreads() by polling them in a busy loop. That loop fights the worker
threads for the GIL: profiled on the 2-core CI box, 75% of a GEMV test's 308 s went to the
poll (300 million `Thread.is_alive` calls). Here the last thread to reach a barrier opens it,
and the manager sleeps until a thread ends. The semantics are the simulator's: a barrier opens
when every live thread of the block waits at it; an exception in one thread aborts the others
and is re-raised.

The simulator also finds a block's shared arrays by their call site, which it reads from a full
`traceback.extract_stack` per call: every thread of every block formats the whole stack (pytest's
frames included) and stats its files through linecache, ~40% of the CPU time of an attention
test. `_shared_array_by_call_site` keys the same (file, line) from the caller's frame directly.
And every call of a device function swaps its module's `cuda` for the fake module under a
per-module lock, twice per call: with a block's 128 threads calling dp4a in a loop, those locks
and the GIL hand-offs they cause were most of a GEMV test's time. Here a launch swaps every
device function's module once for the whole launch (the simulator runs one launch at a time),
and device calls inside it go straight to the function.

`install()` patches numba_cuda's simulator in place (conftest.py calls it before any test).
"""

from __future__ import annotations

import sys
import threading
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import numpy as np
from numba.cuda.simulator import kernel as sim
from numba.cuda.simulator import kernelapi


def _run(self, grid_point, *args):
    threads = [sim.BlockThread(lambda: self._f(*args), self, grid_point, block_point, self._debug)
               for block_point in np.ndindex(*self._block_dim)]
    self.condition, self.blocked, self.finished = threading.Condition(), set(), 0
    self.threads, self.failed = len(threads), None
    for thread in threads:
        thread.start()
    with self.condition:  # woken only when a thread ends (barriers are opened by the threads)
        while self.finished < len(threads) and self.failed is None:
            self.condition.wait()
    if self.failed is not None:
        for other in threads:  # as the simulator: abort the others, then raise
            other.abort = True
            other.syncthreads_blocked = False
            other.syncthreads_event.set()
        raise self.failed.exception[0].with_traceback(self.failed.exception[1])
    for thread in threads:
        thread.join()


def _open_barrier_if_all_wait(manager) -> None:
    """With manager.condition held: when every live thread waits at the barrier, release them."""
    alive = manager.threads - manager.finished
    if alive and len(manager.blocked) == alive:
        for thread in manager.blocked:
            thread.syncthreads_blocked = False
            thread.syncthreads_event.set()
        manager.blocked = set()


def _syncthreads(self):
    if self.abort:
        raise RuntimeError("abort flag set on syncthreads call")
    manager = self._manager
    with manager.condition:
        self.syncthreads_blocked = True
        manager.blocked.add(self)
        _open_barrier_if_all_wait(manager)  # the last to arrive opens it (its own event too)
    self.syncthreads_event.wait()
    self.syncthreads_event.clear()
    if self.abort:
        raise RuntimeError("abort flag set on syncthreads clear")


_thread_run = sim.BlockThread.run


def _thread_run_then_notify(self):
    try:
        _thread_run(self)  # records an exception on the thread instead of raising
    finally:
        manager = self._manager
        with manager.condition:
            manager.finished += 1
            if self.exception and manager.failed is None:
                manager.failed = self
            _open_barrier_if_all_wait(manager)  # the others may all be waiting for this one
            manager.condition.notify()


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
    sim.BlockThread.syncthreads = _syncthreads
    sim.BlockThread.run = _thread_run_then_notify
