"""AG+GEMM: the lane gathers peers' rows with the copy engines, a flag per chunk; one GEMM waits per tile."""

from __future__ import annotations

import torch

from interlace.engine.comm import Group
from interlace.engine.comm.group import ring
from interlace.ops.gemm import WaitHook, gemm

from .base import FusedOp


class FusedAllGatherMatmul(FusedOp):
    """``y = all_gather(x_shard_m) @ w.T (+ bias)`` with x_shard_m ``[rows, k]`` per rank."""

    def __init__(self, group: Group, rows: int, k: int, dtype: torch.dtype, *, check: bool = True, wait_timeout: float | None = None,
                 graph_safe: bool = False):  # fmt: skip
        self.rows, self.k, self.dtype = rows, k, dtype
        super().__init__(group, group.world_size * rows * k * dtype.itemsize, group.world_size, "AG+GEMM",
                         check=check, wait_timeout=wait_timeout, graph_safe=graph_safe)  # fmt: skip

    def _gathered(self, rank: int) -> torch.Tensor:
        return self.buffer.peer(rank, self.dtype, (self.world, self.rows, self.k))

    def __call__(self, x_shard_m: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[all_gather(x_shard_m) @ w.T for w in weights]``: the first GEMM overlaps the gather,
        the others reuse the gathered rows."""
        self._expect(x_shard_m, (self.rows, self.k), "AG+GEMM x_shard_m")
        if not weights:
            raise ValueError(f"rank {self.rank}: AG+GEMM needs at least one weight, got none")
        for i, w in enumerate(weights):
            self._expect(w, (w.shape[0] if w.dim() == 2 else "N", self.k), f"AG+GEMM weights[{i}]")
        r, buf = self.rank, self.buffer
        mine = self._gathered(r)
        x = mine.view(self.world * self.rows, self.k)
        hook = WaitHook(buf.flags(r), self.epoch_now, self.rows, label=f"AG+GEMM rank {r}")
        hooks = {"wait": hook, "start_chunk": r, "wait_timeout": self.wait_timeout, "check": False, "status": self.status}
        capturing, plan = self._begin(x, weights[0], hooks, waits=True)
        value = self._value()
        self._after_peers_read(r)  # peers hold copies of my rows of the last epoch before I overwrite them

        def publish_and_pull():
            self.lane.copy([(mine[r], x_shard_m.contiguous())], buf.flags(r), [r], value)
            for q in ring(self.rank, self.world):
                self.lane.wait_flag(buf.flags(q), q, value, f"AG+GEMM rank {r}: rank {q}'s rows: ")
                self.lane.copy([(mine[q], self._gathered(q)[q])], buf.flags(r), [q], value)

        self.lane.after_current_stream()
        self.lane.run(publish_and_pull)  # queued before the GEMM: the GEMM spins on these copies' flags
        ys = [gemm(x, weights[0], plan=plan, **hooks)]
        self.lane.join()
        self._finish([(q, q, 1) for q in range(self.world)], capturing)
        return ys + [x @ w.T for w in weights[1:]]
