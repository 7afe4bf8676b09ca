"""Sum of up to eight ranks' buffers in rank order, accumulated in fp32 and rounded once.

The same arithmetic as ``interlace.engine.comm.reduce.reduce_in_rank_order`` (fp32 adds in rank
order, one rounding), so both give the same bits; this one reads every part once and writes the
result once, where the torch version makes one fp32 pass per part. Parts are separate typed
pointer arguments (``p0`` .. ``p7``, the first ``WORLD`` used), summed by an unrolled chain
guarded by the constexpr ``WORLD``: a loop would need pointers loaded from memory, untyped.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_WORLD = 8
NUM_WARPS = 4
BLOCK = 1024  # elements per program: eight bf16 (one 16-byte load) per thread of NUM_WARPS warps


@triton.jit
def _load_f32(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def sum_in_rank_order(p0, p1, p2, p3, p4, p5, p6, p7, offsets, mask, WORLD: tl.constexpr):
    acc = _load_f32(p0, offsets, mask)
    if WORLD > 1:
        acc += _load_f32(p1, offsets, mask)
    if WORLD > 2:
        acc += _load_f32(p2, offsets, mask)
    if WORLD > 3:
        acc += _load_f32(p3, offsets, mask)
    if WORLD > 4:
        acc += _load_f32(p4, offsets, mask)
    if WORLD > 5:
        acc += _load_f32(p5, offsets, mask)
    if WORLD > 6:
        acc += _load_f32(p6, offsets, mask)
    if WORLD > 7:
        acc += _load_f32(p7, offsets, mask)
    return acc


@triton.jit
def sum_parts_kernel(p0, p1, p2, p3, p4, p5, p6, p7, out_ptr, numel, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    acc = sum_in_rank_order(p0, p1, p2, p3, p4, p5, p6, p7, offsets, mask, WORLD)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
