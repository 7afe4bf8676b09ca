"""GEMM+RS and one-shot GEMM+AR: one GEMM counts finished outputs per chunk; the lane pulls peers' chunks and reduces."""

from __future__ import annotations

import torch

from interlace.engine.comm import Group
from interlace.engine.comm.group import ring
from interlace.engine.comm.reduce import reduce_into
from interlace.kernels.reduce import MAX_WORLD
from interlace.ops.gemm import FIRST_LAUNCHES, SignalHook, chunk_outputs, gemm
from interlace.ops.reduce import sum_parts

from .base import FusedOp, check_counters, chunk_rows_for


class _MatmulThenReduce(FusedOp):
    """GEMM into the symmetric buffer, counting finished outputs per row chunk; the lane pulls each
    peer's chunk of the rows ``reduced`` with the copy engines (no SMs: a persistent GEMM holds them)
    as soon as that peer has finished it, then reduces them locally in rank order, one pass over the
    parts. The reduction follows every pull on the lane: a kernel queued between pulls would wait
    for SMs the GEMM holds, and hold back the pulls behind it. ``staging`` holds the pulled rows:
    ``world - 1`` copies of this rank's output. Flags: one signal counter per chunk, then DONE (this
    rank finished reading its peers)."""

    def __init__(self, group, m, n, dtype, chunk_rows, reduced: slice, name, *, check, wait_timeout, graph_safe):
        self.m, self.n, self.dtype, self.chunk_rows, self.reduced = m, n, dtype, chunk_rows, reduced
        self.chunks = self.done = -(-m // chunk_rows)
        check_counters(group, name, chunk_rows, n)
        super().__init__(group, m * n * dtype.itemsize, self.chunks + 1, name, check=check, wait_timeout=wait_timeout,
                         graph_safe=graph_safe)  # fmt: skip
        self.staging = torch.empty(self.world - 1, reduced.stop - reduced.start, n, dtype=dtype, device=group.device)
        if group.device.type == "cuda" and self.world <= MAX_WORLD:
            # Compile and load the one-pass sum now, not inside a CUDA graph's capture; and fail
            # here, not fall back to torch's pass per rank, if it cannot take these operands.
            with FIRST_LAUNCHES:
                sum_parts(self._parts(), torch.empty_like(self._partial(self.rank)[reduced]))

    def _partial(self, rank: int) -> torch.Tensor:
        return self.buffer.peer(rank, self.dtype, (self.m, self.n))

    def _staged(self, rank: int) -> torch.Tensor:
        return self.staging[(rank - self.rank - 1) % self.world]

    def _parts(self) -> list[torch.Tensor]:
        """Every rank's rows ``reduced``, in rank order: this rank's partial, its peers' pulled."""
        return [self._partial(q)[self.reduced] if q == self.rank else self._staged(q) for q in range(self.world)]

    def _rows(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.m))

    def _run(self, x: torch.Tensor, weight: torch.Tensor, start_chunk: int, peers: list[int]) -> torch.Tensor:
        """Rows ``reduced`` of the sum over ranks of ``x @ weight.T``; ``peers``: the order in which
        they are expected to finish each chunk of those rows."""
        self._expect_matmul(x, weight, self.m, self.n)
        buf, r, reduced = self.buffer, self.rank, self.reduced
        hooks = {"out": self._partial(r), "signal": SignalHook(buf.flags(r), self.chunk_rows), "start_chunk": start_chunk,
                 "status": self.status}  # fmt: skip
        capturing, plan = self._begin(x, weight, hooks)
        self._after_peers_read(self.done)  # peers finished reading my partials of the last epoch
        outputs = chunk_outputs(self.m, self.n, self.chunk_rows)
        mine = range(reduced.start // self.chunk_rows, -(-reduced.stop // self.chunk_rows))  # the chunks reduced
        out = torch.empty(reduced.stop - reduced.start, self.n, dtype=self.dtype, device=x.device)

        def consume():
            for c in mine:
                rows = self._rows(c)
                for q in peers:
                    self._await(q, c, outputs[c])
                    self.lane.move([(self._staged(q)[rows.start - reduced.start : rows.stop - reduced.start], self._partial(q)[rows])])
            self.lane.publish(buf.flags(r), self.done, self._value())
            self.lane.after_main()  # the reduction reads this rank's partial of every chunk reduced: its GEMM ends with them
            reduce_into(self._parts(), "sum", out)

        self.lane.alongside(consume, lambda: gemm(x, weight, plan=plan, **hooks))
        self.lane.join()
        self._finish([(q, c, outputs[c]) for q in range(self.world) for c in mine], capturing)
        return out

    def _await(self, rank: int, chunk: int, outputs: int) -> None:
        what = f"{self.name} rank {self.rank}: rank {rank}'s tiles of chunk {chunk}: "
        self.lane.wait_flag(self.buffer.flags(rank), chunk, self._value(outputs), what)


class FusedMatmulReduceScatter(_MatmulThenReduce):
    """``y_shard_m = reduce_scatter(x @ w.T)`` over rows: x ``[W*rows, k_shard]``, y ``[rows, n]``."""

    def __init__(self, group: Group, rows: int, n: int, dtype: torch.dtype, *, check: bool = True, wait_timeout: float | None = None,
                 graph_safe: bool = False):  # fmt: skip
        mine = slice(group.rank * rows, (group.rank + 1) * rows)
        super().__init__(group, group.world_size * rows, n, dtype, rows, mine, "GEMM+RS", check=check, wait_timeout=wait_timeout,
                         graph_safe=graph_safe)  # fmt: skip

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r, w = self.rank, self.world
        # Rank q produces blocks from q + 1 on, around the ring: rank r - 1 finishes block r first,
        # and every rank finishes its own block last.
        return self._run(x, weight, (r + 1) % w, [(r - 1 - p) % w for p in range(w - 1)])


class FusedMatmulAllReduce(_MatmulThenReduce):
    """``y = all_reduce(x @ w.T)``: x ``[m, k_shard]``, y ``[m, n]``, pulled in ``chunks`` row chunks."""

    def __init__(self, group: Group, m: int, n: int, dtype: torch.dtype, chunks: int = 4, *, check: bool = True,
                 wait_timeout: float | None = None, graph_safe: bool = False):  # fmt: skip
        super().__init__(group, m, n, dtype, chunk_rows_for(m, chunks), slice(0, m), "GEMM+AR", check=check, wait_timeout=wait_timeout,
                         graph_safe=graph_safe)  # fmt: skip

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._run(x, weight, 0, ring(self.rank, self.world))  # every rank goes chunk by chunk
