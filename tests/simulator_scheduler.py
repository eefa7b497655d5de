"""A block scheduler for numba's CUDA simulator that waits instead of polling.

The simulator runs each CUDA thread of a block as a Python thread, and its BlockManager finds
threads blocked in syncthreads() by polling them in a busy loop. That loop fights the worker
threads for the GIL: profiled on the 2-core CI box, 75% of a GEMV test's 308 s went to the
poll (300 million `Thread.is_alive` calls). Here a blocked or finished thread notifies a
condition variable and the manager sleeps until then. The semantics are the simulator's: a
barrier opens when every live thread of the block waits at it; an exception in one thread
aborts the others and is re-raised.

`install()` patches numba_cuda's simulator in place (conftest.py calls it before any test).
"""

from __future__ import annotations

import threading

import numpy as np
from numba.cuda.simulator import kernel as sim


def _run(self, grid_point, *args):
    condition = threading.Condition()
    self.condition, self.blocked, self.finished = condition, set(), 0
    threads = [sim.BlockThread(lambda: self._f(*args), self, grid_point, block_point, self._debug)
               for block_point in np.ndindex(*self._block_dim)]
    for thread in threads:
        thread.start()
    with condition:
        while True:
            failed = next((t for t in threads if t.exception), None)
            if failed is not None:
                for other in threads:  # as the simulator: abort the others, then raise
                    other.abort = True
                    other.syncthreads_blocked = False
                    other.syncthreads_event.set()
                raise failed.exception[0].with_traceback(failed.exception[1])
            alive = len(threads) - self.finished
            if alive == 0:
                break
            if len(self.blocked) == alive:  # every live thread waits at the barrier
                for thread in self.blocked:
                    thread.syncthreads_blocked = False
                    thread.syncthreads_event.set()
                self.blocked = set()
            condition.wait()
    for thread in threads:
        thread.join()


def _syncthreads(self):
    if self.abort:
        raise RuntimeError("abort flag set on syncthreads call")
    manager = self._manager
    with manager.condition:
        self.syncthreads_blocked = True
        manager.blocked.add(self)
        manager.condition.notify()
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
            manager.condition.notify()


def install() -> None:
    sim.BlockManager.run = _run
    sim.BlockThread.syncthreads = _syncthreads
    sim.BlockThread.run = _thread_run_then_notify
