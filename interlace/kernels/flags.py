"""One-thread kernels that write or await a flag at a value computed on the device.

The value is ``epoch * scale + offset`` (int32, wrapping), with ``epoch`` loaded from device memory
when the kernel runs: inside a captured CUDA graph each replay sees the epoch of that replay, where
a stream memory operation would replay the value it was captured with. A wait spins (acquire,
system scope) for at most ``patience``, then records ``status = [2, wait_id, value, observed]``
(first failure wins) and returns; it also gives up at once when ``status`` already records a
failure, so a broken call ends quickly instead of stalling every later wait (a CPU lane whose
host wait gives up records ``ABORTED``, stopping the spins at its deadline). A write does nothing
once ``status`` records a failure: a broken operator stops publishing, so its peers time out and
say so instead of reading buffers it no longer guards.

``patience`` is microseconds of the GPU's global timer, so a wait's bound is a time whatever a spin
costs (it grows with the spinners contending for the flag). The interpreter has no clock (the
timer is read with inline assembly, which it cannot run): there ``patience`` counts spins.

No int argument is specialised: one compiled variant serves every call, so a warm-up before a
CUDA-graph capture loads everything the capture will launch.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CLOCKED = tl.constexpr(not INTERPRETING)
FLAG_WAIT_FAILED = 2  # status[0] after a flag wait gave up (the kernel writes 2; the GEMM's waits write 1)
ABORTED = 3  # status[0] written by a CPU lane whose wait gave up at the deadline: every spin gives up at once


@triton.jit
def spin_until(flag_ptr, value, status_ptr, patience):
    """The flag (acquire, system scope) once it reaches ``value`` (wrap-aware ``>=``), or as last seen
    when ``patience`` ran out or ``status`` records a failure. Shared by the GEMM's waits."""
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    failed = tl.atomic_add(status_ptr, 0, sem="relaxed")
    if CLOCKED:
        now = _program_now()
        give_up = now + patience.to(tl.int64) * 1000
    else:
        now = 0
        give_up = patience
    while ((seen - value) < 0) & (now < give_up) & (failed == 0):
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
        failed = tl.atomic_add(status_ptr, 0, sem="relaxed")
        if CLOCKED:
            now = _program_now()
        else:
            now += 1
    return seen


@triton.jit
def _program_now():
    """The global timer (ns), one value for all of the program's threads. Each thread reads its own
    clock, and warps read it apart: a loop ending on it could run once more in one warp than in
    another, and the scalar atomics in the loop are barriers of every warp. A max over a block
    spanning every thread (up to 1024) is the same in all of them."""
    return tl.max(globaltimer() + tl.zeros([1024], tl.int64), axis=0)


@triton.jit
def record_failure(status_ptr, code, where, value, seen):
    """``status = [code, where, value, seen]`` unless a failure is recorded already (first one wins)."""
    if tl.atomic_cas(status_ptr, 0, code) == 0:
        tl.store(status_ptr + 1, where)
        tl.store(status_ptr + 2, value)
        tl.store(status_ptr + 3, seen)


@triton.jit(do_not_specialize=["index", "scale", "offset", "wait_id", "patience"])
def flag_kernel(flags_ptr, index, epoch_ptr, scale, offset, status_ptr, wait_id, patience, WAIT: tl.constexpr):
    value = tl.load(epoch_ptr) * scale + offset
    if WAIT:
        seen = spin_until(flags_ptr + index, value, status_ptr, patience)
        if (seen - value) < 0:
            record_failure(status_ptr, 2, wait_id, value, seen)  # FLAG_WAIT_FAILED
    elif tl.atomic_add(status_ptr, 0, sem="relaxed") == 0:
        tl.atomic_xchg(flags_ptr + index, value, sem="release", scope="sys")
