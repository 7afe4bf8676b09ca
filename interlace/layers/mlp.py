"""Gated MLP (Llama, Mistral, Qwen): ``down(act(gate(x)) * up(x))``, tensor-parallel."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from interlace.engine.comm import Group
from interlace.engine.overlap import autograd as tp

from .linear import ColumnParallelLinear, RowParallelLinear


class ParallelMLP(nn.Module):
    """gate/up column-parallel, down row-parallel; keeps the stock submodule names.

    With ``sequence_parallel`` the input is this rank's token rows and gate and up share ONE
    all-gather, overlapped with both GEMMs (AG+GEMM); down reduce-scatters (GEMM+RS).
    """

    def __init__(self, gate_proj: ColumnParallelLinear, up_proj: ColumnParallelLinear, down_proj: RowParallelLinear,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]):  # fmt: skip
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    @classmethod
    def from_mlp(cls, mlp: nn.Module, group: Group, *, sequence_parallel: bool = False, overlap=None) -> ParallelMLP:
        """From any module with ``gate_proj``, ``up_proj``, ``down_proj`` (nn.Linear) and ``act_fn``."""
        kw = dict(sequence_parallel=sequence_parallel, overlap=overlap)
        return cls(
            ColumnParallelLinear.from_linear(mlp.gate_proj, group, **kw),
            ColumnParallelLinear.from_linear(mlp.up_proj, group, **kw),
            RowParallelLinear.from_linear(mlp.down_proj, group, **kw),
            mlp.act_fn,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        if gate.sequence_parallel:
            gate._check_width(x, gate.in_features, "in_features")
            g, u = tp.all_gather_matmul(x.reshape(-1, gate.in_features), [gate.weight, up.weight], gate.group, gate.overlap)
            g = g if gate.bias is None else g + gate.bias.to(g.dtype)
            u = u if up.bias is None else u + up.bias.to(u.dtype)
        else:
            g, u = gate(x), up(x)
        return self.down_proj(self.act_fn(g) * u)
