"""The simulator patches in simulator_scheduler.py keep numba's CUDA-simulator semantics:
barriers, shared arrays per call site, device functions seeing the fake cuda module, and an
exception in one thread ending the launch instead of hanging it."""

from __future__ import annotations

import numpy as np
import pytest
from numba import config, cuda, float32, int32

pytestmark = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="needs NUMBA_ENABLE_CUDASIM=1")


@cuda.jit(device=True)
def _lane():
    return cuda.threadIdx.x  # needs the launch's fake cuda module inside a device function


@cuda.jit
def _block_sums(x, out):
    """Tree reduction over shared memory with a barrier per level; a second shared array (another
    call site) keeps each block's input reversed, so aliasing the two would corrupt the sum."""
    tid = _lane()
    values = cuda.shared.array(64, float32)
    reversed_ = cuda.shared.array(64, float32)
    values[tid] = x[cuda.blockIdx.x, tid]
    reversed_[63 - tid] = x[cuda.blockIdx.x, tid]
    cuda.syncthreads()
    stride = 32
    while stride > 0:
        if tid < stride:
            values[tid] += values[tid + stride]
        cuda.syncthreads()
        stride //= 2
    if tid == 0:
        out[cuda.blockIdx.x, 0] = values[0]
        out[cuda.blockIdx.x, 1] = reversed_[0]


def test_barriers_and_shared_arrays_per_call_site():
    x = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    out = np.zeros((3, 2), np.float32)
    _block_sums[3, 64](x, out)
    np.testing.assert_array_equal(out[:, 0], x.sum(axis=1))
    np.testing.assert_array_equal(out[:, 1], x[:, 63])


@cuda.jit
def _early_exit(out):
    """Half the threads return before the barrier: it opens for the live ones."""
    tid = cuda.threadIdx.x
    if tid % 2:
        return
    flags = cuda.shared.array(8, int32)
    flags[tid // 2] = 1
    cuda.syncthreads()
    total = 0
    for i in range(8):
        total += flags[i]
    out[tid] = total


def test_a_barrier_waits_only_for_live_threads():
    out = np.zeros(16, np.int32)
    _early_exit[1, 16](out)
    assert out[::2].tolist() == [8] * 8 and not out[1::2].any()


@cuda.jit
def _fails_while_others_wait(x):
    if cuda.threadIdx.x == 5:
        x[1000] = 0  # out of bounds: raises in this thread
    cuda.syncthreads()
    x[cuda.threadIdx.x] = 1


def test_an_exception_in_one_thread_ends_the_launch():
    with pytest.raises(IndexError, match=r"tid=\[5, 0, 0\]"):
        _fails_while_others_wait[1, 32](np.zeros(32, np.int32))


@cuda.jit
def _reads_a_neighbour_without_a_barrier(out):
    """A race on a GPU: after the barrier, each thread writes its slot and reads the slot of the
    thread below it with no barrier between."""
    tid = cuda.threadIdx.x
    slots = cuda.shared.array(8, int32)
    slots[tid] = -1
    cuda.syncthreads()
    slots[tid] = tid
    out[tid] = slots[tid - 1] if tid > 0 else 0


def test_a_missing_barrier_reads_a_stale_value():
    """Threads run in descending order between the first and second barrier, so the lower
    neighbour has not written yet: the race shows as -1 instead of passing by luck."""
    out = np.zeros(8, np.int32)
    _reads_a_neighbour_without_a_barrier[1, 8](out)
    assert out.tolist() == [0] + [-1] * 7
