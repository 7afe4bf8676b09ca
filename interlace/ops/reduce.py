"""Launches of the kernels that sum every rank's rows in rank order: ``interlace.kernels.reduce``
(``out`` = the sum of ``parts``) and ``interlace.kernels.allreduce_norm`` (the sum, a residual add
and RMSNorm, for decode)."""

from __future__ import annotations

import torch
import triton

from interlace.kernels import allreduce_norm
from interlace.kernels import reduce as kernel
from interlace.ops.describe import describe
from interlace.ops.gemm import launching

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
    with launching(out.device):
        kernel.sum_parts_kernel[(triton.cdiv(out.numel(), kernel.BLOCK),)](
            *_padded(parts), out, out.numel(), WORLD=len(parts), BLOCK=kernel.BLOCK, num_warps=kernel.NUM_WARPS
        )


def allreduce_residual_rmsnorm(peers: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(RMSNorm(h) * weight, h)`` with ``h = residual + sum(peers)`` in rank order: one program
    per row. ``peers``: every rank's partial ``[rows, hidden]`` (at most ``MAX_WORLD``), rows contiguous."""
    residual, weight = residual.contiguous(), weight.contiguous()
    out, h = torch.empty_like(residual), torch.empty_like(residual)
    rows, hidden = residual.shape
    with launching(out.device):
        allreduce_norm.allreduce_residual_rmsnorm_kernel[(rows,)](
            *_padded(peers), residual, weight, out, h, hidden, peers[0].stride(0), residual.stride(0), out.stride(0), eps,
            WORLD=len(peers), BLOCK=allreduce_norm.block_for(hidden), num_warps=allreduce_norm.warps_for(hidden),
        )  # fmt: skip
    return out, h


def _padded(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The kernels' ``MAX_WORLD`` pointer arguments: ``parts``, then the first again (unused beyond WORLD)."""
    return parts + [parts[0]] * (kernel.MAX_WORLD - len(parts))


def unsupported(parts: list[torch.Tensor], out: torch.Tensor) -> str | None:
    """Why ``sum_parts`` cannot take these operands, or None."""
    if not 1 <= len(parts) <= kernel.MAX_WORLD:
        return f"1 to {kernel.MAX_WORLD} parts, got {len(parts)}"
    for what, t in [("out", out), *((f"part {i}", p) for i, p in enumerate(parts))]:
        if t.dtype not in DTYPES or t.dtype != out.dtype or t.shape != out.shape or t.device != out.device or not t.is_contiguous():
            layout = "" if t.is_contiguous() else ", not contiguous"
            return f"{what} is {describe(t)}{layout}; every operand must be a contiguous fp32, fp16 or bf16 tensor like out ({describe(out)})"
    return None
