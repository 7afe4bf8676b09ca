"""Decode's row-parallel epilogue fused into Llama-family decoder layers (``overlap="fused"``).

A pre-norm decoder layer computes ``h = x + self_attn(input_layernorm(x))`` and returns
``h + mlp(post_attention_layernorm(h))``; the attention's output projection is row-parallel, so
``self_attn`` ends in an all-reduce. ``fuse_epilogue`` gives the layer interlace's forward,
which computes the same. For a call of at most ``OverlapConfig.norm_rows`` token rows (decode)
in eval mode without autograd or autocast, the output projection returns this rank's partial
product, and ONE kernel all-reduces it over symmetric memory, adds the residual and applies
``post_attention_layernorm`` (``FusedAllReduceResidualNorm``). Other calls go to the layer's own
forward (gradient checkpointing, hooks on it and its return type included).

The layer must be exactly that (the four modules, an RMSNorm ``x * rsqrt(mean(x^2) + eps) *
weight``, an output projection without bias); what is not keeps its own forward, and
``layer.fused_epilogue`` says why. A fused call returns what the original's annotation says:
a tuple (transformers < 4.54) or the hidden states.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from interlace.engine.comm import Group
from interlace.engine.overlap import OverlapConfig

PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass(frozen=True)
class Epilogue:
    group: Group
    rows: int
    eps: float
    check: bool
    returns_tuple: bool
    unfused: Callable  # the layer's own forward, bound

    def applies(self, layer: nn.Module, hidden_states: torch.Tensor) -> bool:
        """Decode-sized, in eval mode without autograd (a checkpointed training step may run its
        first forward without autograd) or autocast, and activations in the norm weight's dtype
        (the kernel writes the activations' dtype; a wider weight would make the unfused norm wider)."""
        rows = hidden_states.numel() // hidden_states.shape[-1]
        return (0 < rows <= self.rows and not layer.training and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(hidden_states.device.type)
                and layer.post_attention_layernorm.weight.dtype == hidden_states.dtype)  # fmt: skip

    def __call__(self, residual: torch.Tensor, partial: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(post_attention_layernorm(h), h) with ``h = residual + all_reduce(partial)``."""
        from interlace.engine.overlap.fused import workspace  # needs Triton: imported when used

        hidden = residual.shape[-1]
        rows = residual.numel() // hidden
        op = workspace(self.group, "ar_norm", rows, hidden, residual.dtype, self.eps, check=self.check)
        normed, h = op(residual.reshape(rows, hidden), norm.weight, partial.reshape(rows, hidden))
        return normed.view_as(residual), h.view_as(residual)


def epilogue_blocker(layer: nn.Module, group: Group) -> str | None:
    """Why ``layer`` (not yet converted) cannot take the fused epilogue, or None. Runs the norm
    once on random rows."""
    from interlace.engine.overlap.fused import fused_unavailable

    reason = fused_unavailable(group, "ar_norm")
    if reason is not None:
        return reason
    missing = [p for p in PARTS if not hasattr(layer, p)]
    extra = [n for n, m in layer.named_children() if n not in PARTS and any(True for _ in m.parameters())]
    if missing or extra:
        return f"{type(layer).__name__} is not a pre-norm decoder layer of {', '.join(PARTS)} (missing {missing}, also {extra})"
    if getattr(getattr(layer.self_attn, "o_proj", None), "bias", True) is not None:
        return "self_attn.o_proj is not a linear layer without bias"
    return _not_rms_norm(layer.post_attention_layernorm)


def fuse_epilogue(layer: nn.Module, group: Group, config: OverlapConfig, blocker: str | None) -> str:
    """Give ``layer`` (converted; ``blocker`` from before) the fused forward unless ``blocker``
    says why not; returns (and stores as ``layer.fused_epilogue``) which."""
    if blocker is not None:
        layer.fused_epilogue = f"off: {blocker}"
        return layer.fused_epilogue
    returns_tuple = "tuple" in str(inspect.signature(type(layer).forward).return_annotation).lower()
    layer.interlace_epilogue = Epilogue(group, config.norm_rows, _eps(layer.post_attention_layernorm), config.check, returns_tuple,
                                        layer.forward)  # fmt: skip
    layer.forward = types.MethodType(_forward, layer)
    layer.fused_epilogue = f"on: calls of at most {config.norm_rows} token rows in eval mode without autograd"
    return layer.fused_epilogue


def _forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    epilogue: Epilogue = self.interlace_epilogue
    if args or not epilogue.applies(self, hidden_states):
        return epilogue.unfused(hidden_states, *args, **kwargs)
    with self.self_attn.o_proj.returning_partial():
        out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    attn, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    normed, h = epilogue(hidden_states, attn, self.post_attention_layernorm)
    h = h + self.mlp(normed)
    if not epilogue.returns_tuple:
        return h
    return (h, *rest[:1]) if kwargs.get("output_attentions") else (h,)


def _eps(norm: nn.Module) -> float | None:
    return next((float(getattr(norm, a)) for a in ("variance_epsilon", "eps") if isinstance(getattr(norm, a, None), float)), None)


def _not_rms_norm(norm: nn.Module) -> str | None:
    """Why ``norm`` is not ``weight * (x * rsqrt(mean(x^2) + eps))`` (checked on random rows), or None."""
    eps, weight = _eps(norm), getattr(norm, "weight", None)
    what = f"post_attention_layernorm ({type(norm).__name__})"
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return f"{what} has no 1-D weight and float eps (variance_epsilon or eps)"
    try:
        x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
        with torch.no_grad():
            x32 = x.float()
            expected = weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float()
            error = (norm(x).float() - expected).abs().max().item()
        tolerance = 8 * torch.finfo(weight.dtype).eps * expected.abs().max().item()
    except Exception as failure:  # e.g. weights on the meta device: not checkable, so not fused
        return f"{what} could not be checked on random rows: {type(failure).__name__}: {failure}"
    if not error <= tolerance:
        return f"{what} does not compute weight * x * rsqrt(mean(x^2) + eps)"
    return None
