"""Persistent Triton GEMM ``y = act(x @ w.T + bias) + residual`` with overlap hooks.

Kernel and autotune configs only; launch wrappers live in ``interlace.ops.gemm``.

Tiles: ``BLOCK_M x BLOCK_N`` output tiles in grouped order (``GROUP_M`` M-blocks share a sweep
over N, for L2 reuse), M-blocks rotated so the walk starts at the block holding row
``start_chunk * chunk_rows``: a rank's own chunk first, then around the ring. With hooks the
wrapper picks a GROUP_M whose groups never straddle a chunk, so chunks complete in walk order. A persistent
program takes tiles ``pid, pid + num_programs, ...``.

Hooks (int32 flag arrays, one entry per chunk of ``chunk_rows`` rows of x / y):
- WAIT: before loading its rows, a tile waits (acquire, bounded spin) until ``flags[c] >= epoch``
  for every chunk c its rows touch. ``epoch`` is read from device memory, so a captured CUDA graph
  can advance it between replays and flags never need resetting. Past ``patience`` (a time: see
  ``interlace.kernels.flags``) it records ``status = [1, chunk, epoch, observed]`` (first failure
  wins), skips the tile, and every later wait gives up at once: the launch ends quickly and the
  wrapper raises.
- SIGNAL: after a tile's store, a CTA barrier, then ``counters[c] +=`` the number of outputs the
  tile wrote in chunk c (release), for every chunk c its rows touch: ``counters[c] == epoch *
  rows_in_chunk(c) * N`` once the epoch-th call has finished chunk c, whatever the block sizes
  (ranks tuned apart still agree on it). Nothing is signalled once ``status`` records a failure:
  a broken operator stops publishing, so its peers time out and say so instead of reading it.

Offsets are int32 unless ``INT64`` (the launcher sets it when an operand spans 2**31 elements).

Flags compare as ``(int32)(flag - value) >= 0`` (what cuStreamWaitValue32 does), so epochs and
counters may wrap. The hooks' atomics are system-scoped: peers on other GPUs read them over IPC.
"""

from __future__ import annotations

import triton
import triton.language as tl

from interlace.kernels.flags import record_failure, spin_until

ACTIVATIONS = {None: 0, "silu": 1, "gelu": 2}


def configs(interpreting: bool, quick: bool = False, fp32: bool = False) -> list[triton.Config]:
    """Autotune candidates. Under the interpreter one small config: every config would be run.
    ``quick`` (tests on a GPU): two, since each candidate is compiled for each new specialization
    (seconds per config); for ``fp32`` operands (no tensor cores: the tests' reference dtype) the
    small one only, as the 128x128 tile compiles several times slower for them."""
    if interpreting:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
              (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 32, 128, 4, 4)]  # fmt: skip
    if quick:
        shapes = [shapes[6]] if fp32 else [shapes[2], shapes[6]]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in shapes
    ]


@triton.jit
def _tile_coords(tile, num_m, num_n, first_m, GROUP_M: tl.constexpr):
    """Grouped tile order, M-blocks rotated to start at ``first_m``."""
    per_group = GROUP_M * num_n
    group = tile // per_group
    first = group * GROUP_M
    size = tl.minimum(num_m - first, GROUP_M)
    pid_m = first + (tile % per_group) % size
    pid_n = (tile % per_group) // size
    return (pid_m + first_m) % num_m, pid_n


@triton.jit
def _wait_chunks(flags_ptr, status_ptr, chunk_first, chunk_last, epoch, patience):
    """1 when every chunk in [chunk_first, chunk_last] reached ``epoch``; 0 after recording a timeout."""
    ready = 1
    for chunk in range(chunk_first, chunk_last + 1):
        seen = spin_until(flags_ptr + chunk, epoch, status_ptr, patience)
        if (seen - epoch) < 0:
            record_failure(status_ptr, 1, chunk, epoch, seen)  # GEMM_WAIT_FAILED
            ready = 0
    return ready


@triton.jit
def _mainloop(x_ptr, w_ptr, rows, cols, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, INT64: tl.constexpr):  # fmt: skip
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k = k0 * BLOCK_K + ks
        if INT64:
            k = k.to(tl.int64)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None] * stride_wk, mask=(cols[None, :] < N) & (k[:, None] < K), other=0.0)
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong; its fp32 is right
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")  # fp32 inputs: no TF32, as torch.matmul by default
    return acc


@triton.jit
def _epilogue(acc, rows, cols, M, N, bias_ptr, res_ptr, stride_rm, stride_rn,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = acc * tl.sigmoid(acc)
    elif ACTIVATION == 2:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    if HAS_RESIDUAL:
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        acc += tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
    return acc


# Hook arguments vary by rank (start_chunk) and operator: one compiled variant serves them all, so
# one eager call of a shape loads everything a CUDA-graph capture of any rank's call launches.
@triton.jit(do_not_specialize=["chunk_rows", "start_chunk", "patience"])
def gemm_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr, flags_ptr, counters_ptr, status_ptr,
    M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_rm, stride_rn,
    epoch_ptr, chunk_rows, start_chunk, patience,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    WAIT: tl.constexpr, SIGNAL: tl.constexpr, UPCAST: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (start_chunk * chunk_rows) // BLOCK_M
    epoch = tl.load(epoch_ptr)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, first_m, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if INT64:
            rows, cols = rows.to(tl.int64), cols.to(tl.int64)
        chunk_first = (pid_m * BLOCK_M) // chunk_rows
        chunk_last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // chunk_rows
        ready = 1
        if WAIT:
            ready = _wait_chunks(flags_ptr, status_ptr, chunk_first, chunk_last, epoch, patience)
        if ready == 1:
            acc = _mainloop(x_ptr, w_ptr, rows, cols, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INT64)  # fmt: skip
            acc = _epilogue(acc, rows, cols, M, N, bias_ptr, res_ptr, stride_rm, stride_rn, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)
            mask = (rows[:, None] < M) & (cols[None, :] < N)
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)
            if SIGNAL:
                tl.debug_barrier()  # every thread's stores precede the release below
                if tl.atomic_add(status_ptr, 0, sem="relaxed") == 0:
                    row_lo, row_hi = pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, M)
                    cols_done = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N)
                    for chunk in range(chunk_first, chunk_last + 1):
                        rows_done = tl.minimum(row_hi, (chunk + 1) * chunk_rows) - tl.maximum(row_lo, chunk * chunk_rows)
                        tl.atomic_add(counters_ptr + chunk, rows_done * cols_done, sem="release", scope="sys")
