"""Launch of ``interlace.kernels.reduce``: ``out`` = the sum of ``parts`` in rank order."""

from __future__ import annotations

import torch
import triton

from interlace.kernels import reduce as kernel
from interlace.ops.describe import describe
from interlace.ops.gemm import INTERPRETER_LOCK

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sum_parts(parts: list[torch.Tensor], out: torch.Tensor) -> None:
    """``out = parts[0] + parts[1] + ...`` in fp32, rounded once: one read of each part."""
    if reason := unsupported(parts, out):
        raise ValueError(f"sum_parts: {reason}")
    launch(parts, out)


def launch(parts: list[torch.Tensor], out: torch.Tensor) -> None:
    """``sum_parts`` for operands that ``unsupported`` accepted."""
    if out.numel() == 0:
        return
    pointers = parts + [parts[0]] * (kernel.MAX_WORLD - len(parts))  # unused beyond WORLD
    with INTERPRETER_LOCK:
        kernel.sum_parts_kernel[(triton.cdiv(out.numel(), kernel.BLOCK),)](
            *pointers, out, out.numel(), WORLD=len(parts), BLOCK=kernel.BLOCK, num_warps=kernel.NUM_WARPS
        )


def unsupported(parts: list[torch.Tensor], out: torch.Tensor) -> str | None:
    """Why ``sum_parts`` cannot take these operands, or None."""
    if not 1 <= len(parts) <= kernel.MAX_WORLD:
        return f"1 to {kernel.MAX_WORLD} parts, got {len(parts)}"
    for what, t in [("out", out), *((f"part {i}", p) for i, p in enumerate(parts))]:
        if t.dtype not in DTYPES or t.dtype != out.dtype or t.shape != out.shape or t.device != out.device or not t.is_contiguous():
            layout = "" if t.is_contiguous() else ", not contiguous"
            return f"{what} is {describe(t)}{layout}; every operand must be a contiguous fp32, fp16 or bf16 tensor like out ({describe(out)})"
    return None
