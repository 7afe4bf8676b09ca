"""Decode's AR+norm: a one-shot all-reduce fused with the residual add and RMSNorm."""

from __future__ import annotations

import torch

from interlace.engine.comm import Group
from interlace.engine.comm.group import ring
from interlace.kernels.reduce import MAX_WORLD
from interlace.ops.gemm import FIRST_LAUNCHES
from interlace.ops.reduce import allreduce_residual_rmsnorm

from .base import FusedOp


class FusedAllReduceResidualNorm(FusedOp):
    """Decode's row-parallel epilogue: ``h = residual + all_reduce(partial)``, ``out = RMSNorm(h) * weight``.
    Returns ``(out, h)``; every rank gets the same bits."""

    def __init__(self, group: Group, rows: int, hidden: int, dtype: torch.dtype, eps: float = 1e-5, *, check: bool = True,
                 graph_safe: bool = False):  # fmt: skip
        if group.world_size > MAX_WORLD:
            raise ValueError(f"rank {group.rank}: the fused all-reduce reads at most {MAX_WORLD} peers, "
                             f"the group has {group.world_size}")  # fmt: skip
        self.rows, self.hidden, self.dtype, self.eps = rows, hidden, dtype, eps
        super().__init__(group, rows * hidden * dtype.itemsize, 2, "AR+norm", check=check, wait_timeout=None, graph_safe=graph_safe)
        if group.device.type == "cuda":  # compile and load the kernel now, not inside a CUDA graph's capture
            scratch = torch.zeros(rows, hidden, dtype=dtype, device=group.device)
            with FIRST_LAUNCHES:
                allreduce_residual_rmsnorm([scratch] * self.world, scratch, scratch[0], eps)

    def __call__(self, residual: torch.Tensor, weight: torch.Tensor, partial: torch.Tensor):
        for name, t in (("residual", residual), ("partial", partial)):
            self._expect(t, (self.rows, self.hidden), f"AR+norm {name}")
        self._expect(weight, (self.hidden,), "AR+norm weight")  # the kernel compiled at construction: one dtype
        ready, done, buf = 0, 1, self.buffer
        capturing, _ = self._begin()
        self._after_peers_read(done)  # peers finished reading my partial of the last epoch
        value = self._value()
        peers = [self.buffer.peer(q, self.dtype, (self.rows, self.hidden)) for q in range(self.world)]

        def publish_and_gather():
            peers[self.rank].copy_(partial)
            self.lane.publish(buf.flags(self.rank), ready, value)
            for q in ring(self.rank, self.world):
                self.lane.wait_flag(buf.flags(q), ready, value, f"AR+norm rank {self.rank}: rank {q}'s partial: ")

        self.lane.after_current_stream()
        self.lane.run(publish_and_gather)
        self.lane.join()
        out, h = allreduce_residual_rmsnorm(peers, residual, weight, self.eps)
        self.lane.after_current_stream()
        self.lane.run(lambda: self.lane.publish(buf.flags(self.rank), done, value))
        self.lane.join()
        self._finish([(q, ready, 1) for q in range(self.world)], capturing)
        return out, h
