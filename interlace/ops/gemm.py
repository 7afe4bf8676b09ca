"""Launch wrapper of the persistent Triton GEMM: ``y = act(x @ w.T + bias) + residual``.

``gemm()`` checks constraints, allocates the output, picks a plan (autotuned once per shape
and dtype, with the hooks off so tuning never waits on flags or bumps counters) and launches a
persistent grid derived from the plan's block sizes. Shapes: ``x [M, K]``, ``w [N, K]`` (any
strides: ``w`` may be a transposed view), ``bias [N]``, ``residual [M, N]``, ``y [M, N]``.

Overlap hooks (``WaitHook``, ``SignalHook``) work on int32 flags, one per chunk of ``chunk_rows``
rows. A wait that runs past ``wait_timeout`` makes ``gemm`` raise ``TimeoutError`` naming the chunk, the
expected and the observed value; the output is never returned. ``check=False`` skips the host
synchronisation this needs (CUDA graphs, streams): call ``hook.check()`` later instead. Waits
record a timeout in ``status`` (int32[4]), fresh per launch unless one is passed: a kept one
lets the replays of a CUDA graph be checked afterwards (the first failure stays recorded).

Tuning runs and times kernels (waiting on its own stream only): call ``gemm`` once per shape before
capturing a CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import threading
from dataclasses import dataclass, field

import numpy
import torch
import triton

from interlace.engine.device import new_stream
from interlace.kernels import gemm as kernel
from interlace.kernels.flags import INTERPRETING
from interlace.ops.describe import describe

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_WAIT_TIMEOUT = 60.0  # seconds a hooked GEMM called on its own waits per chunk (an operator passes its group timeout)
# An interpreted spin costs 0.5 to 0.9 ms (more when the cores are busy), measured on the 2-core CI
# machine with triton 3.7.1: the lower end, so an interpreted wait lasts at least as asked there.
INTERPRETED_SPIN_S = 5e-4
GEMM_WAIT_FAILED = 1  # status[0] after one of the GEMM's waits gave up (the kernel writes 1)
INTERPRETER_PROGRAMS = 2  # sequential programs under the interpreter: two exercise the persistent loop
# The interpreter patches triton.language globally while a kernel runs: two threads interpreting at
# once corrupt each other ("Did you forget to add @triton.jit?"). Rank threads take turns.
INTERPRETER_LOCK = threading.Lock() if INTERPRETING else contextlib.nullcontext()


# Triton (3.6, 3.7) sets a kernel's launcher before it loads the kernel's binary, on its first
# launch in a process: a thread launching it in between passes no function and fails. Rank threads
# build their operators together, and with them make their first launches: those take turns.
FIRST_LAUNCHES = threading.Lock()


def launching(device: torch.device):
    """The context of a Triton launch on ``device``: that device made current (Triton launches on
    the current one, whatever the tensors' device) and, interpreted, the interpreter's turn."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return INTERPRETER_LOCK


def interpreter_problem(interpreting: bool = INTERPRETING, triton_version: str = triton.__version__,
                        numpy_version: str = numpy.__version__) -> str | None:  # fmt: skip
    """Why kernels cannot run under this Triton interpreter, or None. Measured: triton 3.6's
    interpreter converts 1-element arrays to scalars, which numpy 2.4 refuses, so every kernel
    with a loop fails with "TypeError: only 0-dimensional arrays can be converted"; 3.7.1 is fine."""
    if interpreting and _minor(triton_version) < (3, 7) and _minor(numpy_version) >= (2, 4):
        return (f"the Triton {triton_version} interpreter (TRITON_INTERPRET=1) fails with numpy {numpy_version}: "
                "install triton>=3.7 or numpy<2.4")  # fmt: skip
    return None


def _minor(version: str) -> tuple[int, ...]:
    """(3, 7) from '3.7.1', '3.7.0+git1a2b' or '3.7rc1'."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split(".")[:2])


INTERPRETER_PROBLEM = interpreter_problem()  # this process's, once: gemm() raises it


def cannot_launch_on(device: torch.device) -> str | None:
    """Why this process cannot launch Triton kernels on tensors on ``device``, or None."""
    if device.type == "cuda" or INTERPRETING:
        return None
    return "Triton runs kernels on a CUDA GPU (TRITON_INTERPRET=1, set before Triton is imported, runs them on CPU, for tests)"


def patience(seconds: float) -> int:
    """A wait's bound as the kernels take it (see ``interlace.kernels.flags``): microseconds of the
    GPU's timer, or under the interpreter spins; at least 1, at most int32's largest (35 minutes)."""
    if not seconds > 0:
        raise ValueError(f"a wait's timeout must be a positive number of seconds, got {seconds!r}")
    units = seconds / INTERPRETED_SPIN_S if INTERPRETING else seconds * 1e6
    return max(1, math.ceil(min(units, 2**31 - 1)))


@dataclass(frozen=True)
class Plan:
    """Block sizes and grid of one launch."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    programs: int

    def tiles(self, m: int, n: int) -> int:
        return triton.cdiv(m, self.block_m) * triton.cdiv(n, self.block_n)


def chunk_outputs(m: int, n: int, chunk_rows: int) -> list[int]:
    """What a launch adds to each chunk's signal counter: the outputs in its rows, whatever the plan."""
    return [(min((c + 1) * chunk_rows, m) - c * chunk_rows) * n for c in range(triton.cdiv(m, chunk_rows))]


@dataclass
class WaitHook:
    """Tiles wait until ``flags[c] >= epoch`` for every chunk ``c`` their rows touch.

    ``epoch`` may be an int or a 1-element int32 tensor on the GEMM's device (advance it in
    place between CUDA-graph replays). Tiles are visited from chunk ``start_chunk`` on, around
    the ring (pass the same ``start_chunk`` to ``gemm``).
    """

    flags: torch.Tensor
    epoch: int | torch.Tensor
    chunk_rows: int
    label: str = "GEMM"
    status: torch.Tensor | None = field(default=None, repr=False)

    def check(self) -> None:
        """Raise ``TimeoutError`` if a wait of the last launch passed its bound (synchronises)."""
        if self.status is None:
            return
        failed, chunk, expected, observed = self.status.tolist()
        if failed == GEMM_WAIT_FAILED:
            raise TimeoutError(
                f"{self.label}: wait on chunk {chunk} timed out: expected flag >= {expected}, observed {observed} "
                f"(flags {self.flags.tolist()})"
            )
        if failed:  # a kept status another wait wrote: this launch's waits gave up at once
            raise TimeoutError(f"{self.label}: skipped its tiles: its status records an earlier failure {[failed, chunk, expected, observed]}")


@dataclass
class SignalHook:
    """After each tile's store, ``counters[c] +=`` the outputs it wrote in chunk ``c`` (release),
    for every chunk its rows touch: ``counters[c] == epoch * chunk_outputs(M, N, chunk_rows)[c]``
    after the epoch-th call has finished chunk ``c``."""

    counters: torch.Tensor
    chunk_rows: int


def gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    out: torch.Tensor | None = None,
    wait: WaitHook | None = None,
    signal: SignalHook | None = None,
    start_chunk: int = 0,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    plan: Plan | None = None,
    check: bool = True,
    status: torch.Tensor | None = None,
    compile_only: bool = False,
) -> torch.Tensor:
    """``act(x @ w.T + bias) + residual`` into ``out`` (allocated when None); see the module doc.
    ``wait_timeout``: seconds each of ``wait``'s tiles waits for its chunk before giving up.
    ``compile_only`` (GPU): compile and load the kernel this call would launch, and launch nothing:
    a first launch compiles for seconds, which a CUDA-graph capture, or a peer spinning on this
    GEMM's signals, must not wait for."""
    if INTERPRETER_PROBLEM:
        raise RuntimeError(f"gemm: {INTERPRETER_PROBLEM}")
    if compile_only and not x.is_cuda:
        raise ValueError(f"gemm: compile_only compiles for a GPU, and x is on {x.device}")
    m, n = _check_operands(x, w, bias, residual, activation, out)
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    chunk_rows = _check_hooks(wait, signal, m, n, x.device, start_chunk)
    bound = patience(wait_timeout)
    plan = plan or plan_for(x, w)
    if status is None:  # only a wait writes it: without one, a shared zero (no allocation and fill per call)
        shared = not wait and not (x.is_cuda and torch.cuda.is_current_stream_capturing())  # a graph's zero fill waits for replay
        status = _unwritten_status(x.device) if shared else torch.zeros(4, dtype=torch.int32, device=x.device)
    elif status.dtype != torch.int32 or status.numel() < 4 or status.device != x.device:
        raise ValueError(f"gemm: status must be >= 4 int32 on {x.device}, got {describe(status)}")
    epoch = _epoch_tensor(wait, x.device) if wait else status
    if wait:
        wait.status = status
    r = residual if residual is not None else y
    dummy = status  # pointer for absent optional operands; never read
    grid = (plan.programs,)
    with launching(x.device):
        launch = functools.partial(kernel.gemm_kernel.warmup, grid=grid) if compile_only else kernel.gemm_kernel[grid]
        compiled = launch(
            x, w, y, bias if bias is not None else dummy, r, wait.flags if wait else dummy,
            signal.counters if signal else dummy, status,
            m, n, x.shape[1], x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1), r.stride(0), r.stride(1),
            epoch, chunk_rows, start_chunk, bound,
            BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
            GROUP_M=plan.group_m if wait is None and signal is None else chunk_major_group(plan, m, chunk_rows),
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ACTIVATION=kernel.ACTIVATIONS[activation],
            WAIT=wait is not None, SIGNAL=signal is not None, UPCAST=INTERPRETING and x.dtype != torch.float32,
            INT64=needs_int64(x, w, y, r), num_warps=plan.num_warps, num_stages=plan.num_stages,
        )  # fmt: skip
        if compile_only and hasattr(compiled, "_init_handles"):  # None where a cache hook took over
            compiled._init_handles()  # loads the module now, on this device (else at the first launch)
    if check and wait and not compile_only:
        wait.check()
    return y


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset of any of ``tensors`` reaches 2**31 (int32 offsets would wrap)."""
    return any(t.numel() and sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2**31 for t in tensors)


@functools.lru_cache(maxsize=None)
def _unwritten_status(device: torch.device) -> torch.Tensor:
    return torch.zeros(4, dtype=torch.int32, device=device)


def chunk_major_group(plan: Plan, m: int, chunk_rows: int) -> int:
    """The largest L2-reuse group that never straddles a chunk, so chunks complete one by one.

    Groups of GROUP_M M-blocks interleave their rows; aligned to chunks they stay inside one.
    When chunks are not whole M-blocks (or the last chunk is short), plain row-major order.
    """
    if chunk_rows % plan.block_m or m % chunk_rows:
        return 1
    return math.gcd(plan.group_m, chunk_rows // plan.block_m)


def plan_for(x: torch.Tensor, w: torch.Tensor) -> Plan:
    """The plan for this shape and dtype: the autotuner's pick, measured once without hooks."""
    return _plan(x.shape[0], w.shape[0], x.shape[1], x.dtype, x.device)


def leave_sms(plan: Plan, device: torch.device, spare: int, sharing: int = 1) -> Plan:
    """``plan`` with at most ``(SMs - spare) // sharing`` programs: room for ``spare`` blocks of other
    kernels beside the persistent GEMM, for ``sharing`` GEMMs at once (rank threads on one GPU)."""
    if device.type != "cuda":
        return plan
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return dataclasses.replace(plan, programs=max(1, min(plan.programs, (sms - spare) // sharing)))


_PLANS: dict[tuple, Plan] = {}
# One tuning at a time: rank threads tuning side by side on one GPU would time each other's kernels.
_TUNING = threading.Lock()


def _plan(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> Plan:
    """Kept per shape, dtype and kind of device (its SM count), tuned on ``device``."""
    sms = _sms(device)
    key = (m, n, k, dtype, device.type, sms)
    if key in _PLANS:  # without the lock: rank threads need not queue behind one that is tuning
        return _PLANS[key]
    with _TUNING:
        if key not in _PLANS:
            configs = kernel.configs(INTERPRETING, quick=_quick_tuning(), fp32=dtype == torch.float32)
            best = configs[0] if len(configs) == 1 else _autotune(m, n, k, dtype, configs, device)
            b = best.kwargs
            tiles = triton.cdiv(m, b["BLOCK_M"]) * triton.cdiv(n, b["BLOCK_N"])
            _PLANS[key] = Plan(b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"], b["GROUP_M"], best.num_warps, best.num_stages,
                               max(1, min(sms, tiles)))  # fmt: skip
        return _PLANS[key]


def _autotune(m: int, n: int, k: int, dtype: torch.dtype, configs: list, device: torch.device) -> triton.Config:
    """Time every config on scratch operands of this shape (hooks off) on ``device`` (the caller's
    operands', whatever the thread's current device) and keep the fastest."""
    with torch.cuda.device(device):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"gemm: the first call for shape M={m} N={n} K={k} {dtype} tunes (it runs and times kernels): "
                               "make it once before capturing a CUDA graph")  # fmt: skip
    stream = _tuning_stream(device.index)
    with torch.cuda.stream(stream):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        sms = _sms(device)
        timings = {}
        for cfg in configs:
            b = cfg.kwargs
            plan = Plan(b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"], b["GROUP_M"], cfg.num_warps, cfg.num_stages,
                        max(1, min(sms, triton.cdiv(m, b["BLOCK_M"]) * triton.cdiv(n, b["BLOCK_N"]))))  # fmt: skip
            try:
                timings[cfg] = _time_on(stream, lambda p=plan: gemm(x, w, plan=p))
            except triton.runtime.errors.OutOfResources:  # too much shared memory for this GPU
                continue
    return min(timings, key=timings.get)


def _quick_tuning() -> bool:
    """``INTERLACE_TUNE=quick``: a few candidate configs instead of all (``kernel.configs``; the GPU tests set it)."""
    mode = os.environ.get("INTERLACE_TUNE", "full")
    if mode not in ("full", "quick"):
        raise ValueError(f"INTERLACE_TUNE must be 'full' or 'quick', got {mode!r}")
    return mode == "quick"


@functools.lru_cache(maxsize=None)
def _tuning_stream(index: int) -> torch.cuda.Stream:
    return new_stream(torch.device("cuda", index))


def _time_on(stream: torch.cuda.Stream, fn, reps: int = 20) -> float:
    """Milliseconds per ``fn()`` on ``stream``, waiting on that stream's events only: a device-wide
    synchronize would also wait for work queued on other streams, which (rank threads sharing a
    GPU, or a fused operator's lanes) may wait in turn on a peer that is tuning right now."""
    fn()  # compiles
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(reps):
        fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / reps


@functools.lru_cache(maxsize=None)
def _sms_of(device_type: str, index: int) -> int:
    if INTERPRETING or device_type != "cuda":
        return INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    return _sms_of(device.type, device.index if device.index is not None else 0)


def _epoch_tensor(wait: WaitHook, device: torch.device) -> torch.Tensor:
    if isinstance(wait.epoch, torch.Tensor):
        return wait.epoch
    return torch.full((1,), wait.epoch, dtype=torch.int32, device=device)


def _check_operands(x, w, bias, residual, activation, out) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"gemm expects 2-D tensors x [M, K] and w [N, K], got {describe(x)} and {describe(w)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"gemm: x {describe(x)} and w {describe(w)} disagree on K ({x.shape[1]} vs {w.shape[1]})")
    if x.dtype not in DTYPES or w.dtype != x.dtype:
        raise TypeError(f"gemm: x and w must share one of {[str(d) for d in DTYPES]}, got {x.dtype} and {w.dtype}")
    if w.device != x.device:
        raise ValueError(f"gemm: x is on {x.device}, w on {w.device}")
    if reason := cannot_launch_on(x.device):
        raise ValueError(f"gemm: x is on {x.device}: {reason}")
    if activation not in kernel.ACTIVATIONS:
        raise ValueError(f"gemm: activation must be one of {list(kernel.ACTIVATIONS)}, got {activation!r}")
    m, n = x.shape[0], w.shape[0]
    for name, t, shape in (("bias", bias, (n,)), ("residual", residual, (m, n)), ("out", out, (m, n))):
        if t is not None and (tuple(t.shape) != shape or t.device != x.device or (name != "bias" and t.dtype != x.dtype)):
            raise ValueError(f"gemm: {name} must be {list(shape)} on {x.device}" + ("" if name == "bias" else f" in {x.dtype}") + f", got {describe(t)}")
    return m, n


def _check_hooks(wait, signal, m, n, device, start_chunk) -> int:
    hooks = [h for h in (wait, signal) if h is not None]
    if not hooks:
        return 1
    chunk_rows = hooks[0].chunk_rows
    if any(h.chunk_rows != chunk_rows for h in hooks) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"gemm: hooks need one positive int chunk_rows, got {[h.chunk_rows for h in hooks]}")
    chunks = triton.cdiv(m, chunk_rows)
    for name, flags in (("wait.flags", wait and wait.flags), ("signal.counters", signal and signal.counters)):
        if flags is not None and (flags.dtype != torch.int32 or flags.dim() != 1 or flags.numel() < chunks
                                  or not flags.is_contiguous() or flags.device != device):  # fmt: skip
            raise ValueError(f"gemm: {name} must be a contiguous int32 vector of >= {chunks} chunks on {device}, got {describe(flags)}")
    if signal is not None and chunk_rows * n >= 2**31:
        raise ValueError(f"gemm: a chunk of {chunk_rows} rows x {n} columns is more outputs than an int32 counter can count per call")
    if not 0 <= start_chunk < chunks:
        raise ValueError(f"gemm: start_chunk must be in [0, {chunks}), got {start_chunk}")
    if wait is not None and isinstance(wait.epoch, int) and wait.epoch < 1:
        raise ValueError(f"gemm: wait.epoch must be >= 1 (flags start at 0), got {wait.epoch}")
    if wait is not None and isinstance(wait.epoch, torch.Tensor) and (
        wait.epoch.dtype != torch.int32 or wait.epoch.numel() != 1 or wait.epoch.device != device
    ):  # the kernel compares it with the int32 flags as loaded
        raise ValueError(f"gemm: a tensor wait.epoch must be 1 int32 element on {device}, got {describe(wait.epoch)}")
    return chunk_rows
