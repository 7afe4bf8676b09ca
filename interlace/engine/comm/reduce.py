"""The reduction every in-process transport uses, so they all give the same bits."""

from __future__ import annotations

import torch


def reduce_in_rank_order(parts: list[torch.Tensor], op: str) -> torch.Tensor:
    """Reduce in rank order, accumulating half precision in fp32 and rounding once (by the caller's
    copy into its output): every rank computing it gets identical results."""
    acc_dtype = torch.float32 if parts[0].dtype in (torch.float16, torch.bfloat16) else parts[0].dtype
    acc = parts[0].to(acc_dtype, copy=True)
    for part in parts[1:]:
        if op == "max":
            torch.maximum(acc, part.to(acc_dtype), out=acc)
        else:
            acc += part
    if op == "avg":
        acc /= len(parts)
    return acc


def reduce_into(parts: list[torch.Tensor], op: str, out: torch.Tensor) -> None:
    """``out`` = ``reduce_in_rank_order(parts, op)``, the same bits. On a GPU a sum that
    ``interlace.ops.reduce`` takes (at most eight contiguous fp32/fp16/bf16 parts) is one kernel
    reading each part once, where torch makes one fp32 pass per part."""
    if op == "sum" and out.is_cuda:
        from interlace.ops import reduce as one_pass  # triton: imported where a GPU is, not for comm alone

        if one_pass.unsupported(parts, out) is None:
            one_pass.launch(parts, out)
            return
    out.copy_(reduce_in_rank_order(parts, op))


def rows(t: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    """Block ``index`` of ``parts`` equal blocks of rows."""
    n = t.shape[0] // parts
    return t.narrow(0, index * n, n)
