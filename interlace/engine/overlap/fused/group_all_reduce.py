"""GEMM+AR across nodes: one GEMM counts finished outputs per chunk; the lane all-reduces each chunk with the group's own all-reduce."""

from __future__ import annotations

import torch

from interlace.engine.comm import Group
from interlace.ops.gemm import SignalHook, chunk_outputs, gemm

from .base import FusedOp, check_counters, chunk_rows_for


# SMs the GEMM leaves free for the group's all-reduce kernels (NCCL's): a starting point, not yet measured.
COLLECTIVE_SMS = 8


class FusedMatmulGroupAllReduce(FusedOp):
    """``y = all_reduce(x @ w.T)`` where ranks share no memory (several nodes): x ``[m, k_shard]``,
    y ``[m, n]``. ONE GEMM counts finished outputs per row chunk; the lane all-reduces each chunk
    with the group's own all-reduce (NCCL on GPUs) once this rank has finished it, while the GEMM
    goes on with the next. Every rank goes chunk by chunk, so the all-reduces pair up."""

    unseen = "the GPU is slow, or a peer has not joined the group's all-reduce of a chunk"

    def __init__(self, group: Group, m: int, n: int, dtype: torch.dtype, chunks: int = 4, *, check: bool = True,
                 wait_timeout: float | None = None, graph_safe: bool = False, collective_sms: int = COLLECTIVE_SMS):  # fmt: skip
        """``collective_sms``: SMs the persistent GEMM leaves free, where the group's all-reduce
        kernels (NCCL's, a block per channel) run beside it; with none they would wait for the
        GEMM to end."""
        self.m, self.n, self.dtype, self.collective_sms = m, n, dtype, collective_sms
        self.chunk_rows = chunk_rows_for(m, chunks)
        self.chunks = -(-m // self.chunk_rows)
        check_counters(group, "GEMM+AR(group)", self.chunk_rows, n)
        super().__init__(group, None, self.chunks, "GEMM+AR(group)", check=check, wait_timeout=wait_timeout, graph_safe=graph_safe)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self._expect_matmul(x, weight, self.m, self.n)
        y = torch.empty(self.m, self.n, dtype=self.dtype, device=x.device)
        hooks = {"out": y, "signal": SignalHook(self.own_flags, self.chunk_rows), "status": self.status}
        capturing, plan = self._begin(x, weight, hooks, spare=self.collective_sms)
        outputs = chunk_outputs(self.m, self.n, self.chunk_rows)

        def all_reduce_chunks():
            for c in range(self.chunks):
                what = f"{self.name} rank {self.rank}: its own tiles of chunk {c}: "
                self.lane.wait_flag(self.own_flags, c, self._value(outputs[c]), what)
                rows = y[c * self.chunk_rows : (c + 1) * self.chunk_rows]
                self.group.all_reduce(rows, out=rows)

        self.lane.alongside(all_reduce_chunks, lambda: gemm(x, weight, plan=plan, **hooks))
        self.lane.join()
        self._finish([(self.rank, c, outputs[c]) for c in range(self.chunks)], capturing)
        return y
