"""Column- and row-parallel linear layers: stock nn.Linear parameter names and layouts.

``ColumnParallelLinear`` holds rows ``[rank*n, (rank+1)*n)`` of the weight ``[out, in]`` and
produces this rank's ``out/W`` features (``y_shard_n``); ``RowParallelLinear`` holds columns of
the weight and reduces partial products over ranks. With ``sequence_parallel=True`` a column
layer takes this rank's token rows (``x_shard_m [n, in]``) and all-gathers them into its GEMM,
and a row layer reduce-scatters its output over tokens (``y_shard_m [n, out]``); otherwise a row
layer all-reduces. ``overlap`` picks how each collective meets its GEMM (OverlapConfig).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from interlace.engine.comm import Group
from interlace.engine.overlap import OverlapConfig, as_config
from interlace.engine.overlap import autograd as tp


class _ParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group: Group, weight_shape, bias_features, *,
                 bias: bool, sequence_parallel: bool, overlap, device, dtype):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.sequence_parallel, self.overlap = sequence_parallel, as_config(overlap)
        self.weight = nn.Parameter(torch.empty(weight_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(bias_features, device=device, dtype=dtype)) if bias else None
        self._reset(in_features)

    def _reset(self, fan_in: int) -> None:
        """nn.Linear's initialisation, drawn per shard."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _check_width(self, x: torch.Tensor, expected: int, what: str) -> None:
        if x.shape[-1] != expected:
            raise ValueError(
                f"rank {self.group.rank}: {type(self).__name__} expects {what} = {expected} input features, "
                f"got input of shape {list(x.shape)}"
            )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"world_size={self.group.world_size}, sequence_parallel={self.sequence_parallel}, overlap={self.overlap.strategy}")  # fmt: skip


class ColumnParallelLinear(_ParallelLinear):
    """``y_shard_n = x @ weight.T + bias``: this rank's slice of the output features.

    Input: ``x [..., in]`` replicated on every rank, or with ``sequence_parallel=True`` this rank's
    token rows ``x_shard_m [n, in]`` (the result then covers all ``W*n`` rows). ``gather_output``
    all-gathers the features so every rank gets ``[..., out]`` (the LM head does this).
    """

    def __init__(self, in_features: int, out_features: int, group: Group, *, bias: bool = True,
                 sequence_parallel: bool = False, gather_output: bool = False,
                 overlap: OverlapConfig | str | None = None, shards: int | None = None,
                 device=None, dtype=None):  # fmt: skip
        shards = shards or group.world_size
        local = _split(out_features, shards, "out_features", group, type(self).__name__)
        super().__init__(in_features, out_features, group, (local, in_features), local, bias=bias,
                         sequence_parallel=sequence_parallel, overlap=overlap, device=device, dtype=dtype)  # fmt: skip
        self.gather_output = gather_output

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group, *, shards: int | None = None, index: int | None = None, **kwargs):
        """This rank's rows of ``linear``: part ``index`` (default: rank) of ``shards`` (default: world size).

        Several ranks may hold the same part (replicated key/value heads, for instance).
        """
        shards, index = shards or group.world_size, group.rank if index is None else index
        layer = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None, shards=shards,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)  # fmt: skip
        n = layer.weight.shape[0]
        with torch.no_grad():
            layer.weight.copy_(linear.weight[index * n : (index + 1) * n])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[index * n : (index + 1) * n])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_width(x, self.in_features, "in_features")
        if self.sequence_parallel:
            (y,) = tp.all_gather_matmul(x.reshape(-1, self.in_features), [self.weight], self.group, self.overlap)
            y = y if self.bias is None else y + self.bias.to(y.dtype)  # y's dtype: autocast's, as F.linear's
        else:
            y = F.linear(tp.copy_to_parallel(x, self.group), self.weight, self.bias)
        return tp.gather_last_dim(y, self.group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """``y = sum over ranks of x_shard_k @ weight.T``, then ``+ bias`` (bias replicated, added once).

    Input: ``x [..., in/W]``, this rank's input features (a column layer's output). Output:
    ``[..., out]`` all-reduced, or with ``sequence_parallel=True`` this rank's token rows
    ``y_shard_m [n, out]`` of the tokens padded to a multiple of the world size.
    """

    def __init__(self, in_features: int, out_features: int, group: Group, *, bias: bool = True,
                 sequence_parallel: bool = False, overlap: OverlapConfig | str | None = None,
                 device=None, dtype=None):  # fmt: skip
        local = _split(in_features, group.world_size, "in_features", group, type(self).__name__)
        super().__init__(in_features, out_features, group, (out_features, local), out_features, bias=bias,
                         sequence_parallel=sequence_parallel, overlap=overlap, device=device, dtype=dtype)  # fmt: skip
        self._partial = False  # see returning_partial

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Group, **kwargs):
        """This rank's columns of ``linear``; the bias is copied whole."""
        layer = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)  # fmt: skip
        k = layer.weight.shape[1]
        with torch.no_grad():
            layer.weight.copy_(linear.weight[:, group.rank * k : (group.rank + 1) * k])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @contextlib.contextmanager
    def returning_partial(self):
        """Within it, forward returns this rank's partial product ``x_shard_k @ weight.T``, neither
        reduced nor biased: the caller reduces it (a decoder layer's fused epilogue, decoder.py)."""
        self._partial = True
        try:
            yield
        finally:
            self._partial = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[1]
        self._check_width(x, k, f"in_features/world_size ({self.in_features}/{self.group.world_size})")
        if self._partial:
            return F.linear(x, self.weight)
        if self.sequence_parallel:
            y = tp.matmul_reduce_scatter(pad_rows(x.reshape(-1, k), self.group.world_size), self.weight, self.group, self.overlap)
        else:
            y = tp.matmul_all_reduce(x.reshape(-1, k), self.weight, self.group, self.overlap).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Append zero rows so the row count is a multiple of ``multiple`` (odd token counts, decode)."""
    extra = -x.shape[0] % multiple
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def _split(features: int, shards: int, name: str, group: Group, layer: str) -> int:
    if features % shards:
        raise ValueError(f"rank {group.rank}: {layer} {name}={features} is not divisible by {shards} shards "
                         f"(world size {group.world_size})")  # fmt: skip
    return features // shards
