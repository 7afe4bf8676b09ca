"""Differentiable tensor-parallel primitives: forward overlapped (per config), backward bulk.

Each pairs a forward collective with the collective its gradient needs:

| primitive              | forward                        | backward (grad of input)             |
|------------------------|--------------------------------|--------------------------------------|
| copy_to_parallel       | identity (input replicated)    | all_reduce (partials from each rank) |
| all_reduce_sum         | all_reduce                     | identity                             |
| gather_last_dim        | all_gather of features         | this rank's slice                    |
| shard_rows             | this rank's rows (replicated in) | all_gather                         |
| gather_rows            | all_gather of rows             | this rank's rows (grads replicated)  |
| all_gather_matmul      | AG+GEMM (bulk or chunked)      | reduce_scatter of sum(grad_y @ w)    |
| matmul_reduce_scatter  | GEMM+RS                        | all_gather(grad) @ w                 |
| matmul_all_reduce      | GEMM+AR                        | grad @ w                             |

Backward always uses bulk collectives: interlace targets inference; gradients exist for
correctness tests and fine-tuning. Gradients of sharded parameters are complete; those of
parameters replicated across ranks (norms and row biases under sequence parallelism, replicated
key/value heads) are per-rank partials, to be summed over the ranks that share them. On one GPU, LocalGroup cannot run backward (autograd runs
every rank's CUDA backward on one device thread, where the ranks' collectives would wait for each
other): LocalGroup refuses a collective called there.
"""

from __future__ import annotations

import contextlib

import torch

from interlace.engine.comm import Group

from . import collective_matmul as cm
from .config import OverlapConfig


def _rows(t: torch.Tensor, group: Group) -> torch.Tensor:
    n = t.shape[0] // group.world_size
    return t[group.rank * n : (group.rank + 1) * n]


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_reduce(grad.contiguous()), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return group.all_reduce(x.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        lead, v = x.shape[:-1], x.shape[-1]
        gathered = group.all_gather(x.reshape(1, -1, v))  # [W, tokens, v]
        return gathered.permute(1, 0, 2).reshape(*lead, group.world_size * v)

    @staticmethod
    def backward(ctx, grad):
        g = ctx.group
        v = grad.shape[-1] // g.world_size
        return grad[..., g.rank * v : (g.rank + 1) * v].contiguous(), None


class _ShardRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _rows(x, group).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_gather(grad.contiguous()), None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_shard_m, group):
        ctx.group = group
        return group.all_gather(x_shard_m.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return _rows(grad, ctx.group).contiguous(), None


class _AllGatherMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_shard_m, group, config, *weights):
        ctx.group = group
        ctx.save_for_backward(x_shard_m, *weights)
        return tuple(cm.all_gather_matmul(x_shard_m.contiguous(), list(weights), group, config))

    @staticmethod
    def backward(ctx, *grad_ys):
        x_shard_m, *weights = ctx.saved_tensors
        g = ctx.group
        x = g.all_gather(x_shard_m.contiguous())  # gathered again rather than kept alive
        grad_x = sum(gy @ w for gy, w in zip(grad_ys, weights))
        grad_ws = [gy.T @ x for gy in grad_ys]
        return (g.reduce_scatter(grad_x.contiguous()), None, None, *grad_ws)


class _MatmulReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group, config):
        ctx.group = group
        ctx.save_for_backward(x, weight)
        return cm.matmul_reduce_scatter(x.contiguous(), weight, group, config)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_full = ctx.group.all_gather(grad.contiguous())
        return grad_full @ weight, grad_full.T @ x, None, None


class _MatmulAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group, config):
        ctx.save_for_backward(x, weight)
        return cm.matmul_all_reduce(x.contiguous(), weight, group, config)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad @ weight, grad.T @ x, None, None


def copy_to_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToParallel.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


def gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherLastDim.apply(x, group)


def shard_rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ShardRows.apply(x, group)


def gather_rows(x_shard_m: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherRows.apply(x_shard_m, group)


def all_gather_matmul(x_shard_m: torch.Tensor, weights: list[torch.Tensor], group: Group, config: OverlapConfig) -> list[torch.Tensor]:
    (x_shard_m, *weights), scope = _as_autocast_would(x_shard_m, *weights)
    with scope:
        return list(_AllGatherMatmul.apply(x_shard_m, group, config, *weights))


def matmul_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, group: Group, config: OverlapConfig) -> torch.Tensor:
    (x, weight), scope = _as_autocast_would(x, weight)
    with scope:
        return _MatmulReduceScatter.apply(x, weight, group, config)


def matmul_all_reduce(x: torch.Tensor, weight: torch.Tensor, group: Group, config: OverlapConfig) -> torch.Tensor:
    (x, weight), scope = _as_autocast_would(x, weight)
    with scope:
        return _MatmulAllReduce.apply(x, weight, group, config)


def _as_autocast_would(*operands: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], contextlib.AbstractContextManager]:
    """Under autocast, the operands cast as it casts a linear layer's (to its lower precision dtype;
    float64 stays), and a scope with autocast off: every strategy then multiplies in one dtype (a
    GEMM into a preallocated chunk, or a Triton GEMM, would not be cast). The casts are
    differentiable: gradients reach float32 parameters as float32."""
    device = operands[0].device.type
    if not torch.is_autocast_enabled(device):
        return operands, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device)
    cast = tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in operands)
    return cast, torch.autocast(device, enabled=False)
