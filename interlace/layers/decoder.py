"""Decode's row-parallel epilogue fused into Llama-family decoder layers (``overlap="fused"``).

A pre-norm decoder layer computes ``h = x + self_attn(input_layernorm(x))`` and returns
``h + mlp(post_attention_layernorm(h))``; the attention's output projection is row-parallel, so
``self_attn`` ends in an all-reduce. ``fuse_epilogue`` gives the layer interlace's forward,
which computes the same. For a call of at most ``OverlapConfig.norm_rows`` token rows (decode)
without autograd, the output projection returns this rank's partial product, and ONE kernel
all-reduces it over symmetric memory, adds the residual and applies ``post_attention_layernorm``
(``FusedAllReduceResidualNorm``). Other calls run the layer's modules as the original forward does.

The layer must be exactly that (the four modules, an RMSNorm ``x * rsqrt(mean(x^2) + eps) *
weight``, an output projection without bias); what is not stays as it was, and
``layer.fused_epilogue`` says why. Its forward returns what the original's annotation says:
a tuple (transformers < 4.54) or the hidden states.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from dataclasses import dataclass

import torch
from torch import nn

from interlace.engine.comm import Group
from interlace.engine.overlap import OverlapConfig

from .linear import RowParallelLinear

PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass(frozen=True)
class Epilogue:
    group: Group
    rows: int
    eps: float
    check: bool
    returns_tuple: bool

    def __call__(self, residual: torch.Tensor, partial: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(post_attention_layernorm(h), h) with ``h = residual + all_reduce(partial)``."""
        from interlace.engine.overlap.fused import workspace  # needs Triton: imported when used

        hidden = residual.shape[-1]
        rows = residual.numel() // hidden
        op = workspace(self.group, "ar_norm", rows, hidden, residual.dtype, self.eps, check=self.check)
        normed, h = op(residual.reshape(rows, hidden), norm.weight, partial.reshape(rows, hidden))
        return normed.view_as(residual), h.view_as(residual)


def fuse_epilogue(layer: nn.Module, group: Group, config: OverlapConfig) -> str:
    """Give ``layer`` the fused forward where it can run; returns (and stores as
    ``layer.fused_epilogue``) what calls use it, or why none does."""
    reason = _unfusable(layer, group)
    if reason is None:
        norm = layer.post_attention_layernorm
        returns_tuple = "tuple" in str(inspect.signature(type(layer).forward).return_annotation).lower()
        layer.interlace_epilogue = Epilogue(group, config.norm_rows, _eps(norm), config.check, returns_tuple)
        layer.forward = types.MethodType(_forward, layer)
        layer.fused_epilogue = f"on: calls of at most {config.norm_rows} token rows without autograd"
    else:
        layer.fused_epilogue = f"off: {reason}"
    return layer.fused_epilogue


def _forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    if args:
        raise TypeError(f"rank {self.interlace_epilogue.group.rank}: a decoder layer with interlace's fused epilogue takes "
                        f"everything after hidden_states by keyword, got {len(args)} more positional arguments")  # fmt: skip
    epilogue: Epilogue = self.interlace_epilogue
    fuse = hidden_states.numel() // hidden_states.shape[-1] <= epilogue.rows and not torch.is_grad_enabled()
    with self.self_attn.o_proj.returning_partial() if fuse else contextlib.nullcontext():
        out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    attn, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    if fuse:
        normed, h = epilogue(hidden_states, attn, self.post_attention_layernorm)
    else:
        h = hidden_states + attn
        normed = self.post_attention_layernorm(h)
    h = h + self.mlp(normed)
    if not epilogue.returns_tuple:
        return h
    return (h, *rest[:1]) if kwargs.get("output_attentions") else (h,)


def _unfusable(layer: nn.Module, group: Group) -> str | None:
    """Why ``layer`` cannot take the fused epilogue, or None."""
    from interlace.engine.overlap.fused import fused_unavailable

    reason = fused_unavailable(group, "ar_norm")
    if reason is not None:
        return reason
    missing = [p for p in PARTS if not hasattr(layer, p)]
    extra = [n for n, m in layer.named_children() if n not in PARTS and any(True for _ in m.parameters())]
    if missing or extra:
        return f"{type(layer).__name__} is not a pre-norm decoder layer of {', '.join(PARTS)} (missing {missing}, also {extra})"
    o_proj = getattr(layer.self_attn, "o_proj", None)
    if not isinstance(o_proj, RowParallelLinear) or o_proj.bias is not None or o_proj.sequence_parallel:
        return "self_attn.o_proj is not a RowParallelLinear without bias that all-reduces"
    return _not_rms_norm(layer.post_attention_layernorm)


def _eps(norm: nn.Module) -> float | None:
    return next((float(getattr(norm, a)) for a in ("variance_epsilon", "eps") if isinstance(getattr(norm, a, None), float)), None)


def _not_rms_norm(norm: nn.Module) -> str | None:
    """Why ``norm`` is not ``weight * (x * rsqrt(mean(x^2) + eps))`` (checked on random rows), or None."""
    eps, weight = _eps(norm), getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return f"post_attention_layernorm ({type(norm).__name__}) has no 1-D weight and float eps (variance_epsilon or eps)"
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        x32 = x.float()
        expected = weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float()
        got = norm(x).float()
    tolerance = 8 * torch.finfo(weight.dtype).eps * expected.abs().max().item()
    if not (got - expected).abs().max().item() <= tolerance:
        return f"post_attention_layernorm ({type(norm).__name__}) does not compute weight * x * rsqrt(mean(x^2) + eps)"
    return None
