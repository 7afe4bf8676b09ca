"""Two-shot GEMM+AR: per row chunk, each rank sums its piece of every peer's rows, then gathers the peers' sums."""

from __future__ import annotations

import torch

from interlace.engine.comm import Group
from interlace.engine.comm.group import ring
from interlace.engine.comm.reduce import reduce_into
from interlace.kernels.reduce import MAX_WORLD
from interlace.ops.flags import EpochValue
from interlace.ops.gemm import FIRST_LAUNCHES, SignalHook, chunk_outputs, gemm
from interlace.ops.reduce import sum_parts

from .base import FusedOp, check_counters, chunk_rows_for


# SMs a two-shot GEMM+AR's persistent GEMM leaves free for its reductions: a starting point, not yet measured.
REDUCE_SMS = 8


class FusedMatmulAllReduceTwoShot(FusedOp):
    """``y = all_reduce(x @ w.T)`` in two shots per row chunk: x ``[m, k_shard]``, y ``[m, n]``.

    Each chunk's rows are cut into W pieces, piece q owned by rank q. As soon as every rank has
    finished a chunk, rank r pulls piece r of it from each peer (copy engines), sums the parts in
    rank order (a kernel on the ``reduce_sms`` SMs the persistent GEMM leaves free), writes the sum
    over piece r of its own buffer and raises the chunk's REDUCED flag, then pulls every peer's
    summed piece into its output while the GEMM computes the next chunk. A rank moves 2(W-1)/W of
    the output, where one-shot moves W-1 times it: the choice for many rows at large W. Every
    element is summed once, by its owner, in rank order, so every rank gets the same bits (those
    of the one-shot operator).
    ``staging``: the pieces of one chunk pulled from peers, about ``(W-1) m / (W chunks)`` rows.
    Flags: the GEMM's counter per chunk, then REDUCED per chunk, then DONE (this rank finished
    reading its peers)."""

    def __init__(self, group: Group, m: int, n: int, dtype: torch.dtype, chunks: int = 4, *, check: bool = True,
                 wait_timeout: float | None = None, graph_safe: bool = False, reduce_sms: int = REDUCE_SMS):  # fmt: skip
        """``reduce_sms``: SMs the persistent GEMM leaves free on its GPU (shared by the ranks of a
        LocalGroup on one GPU), where each chunk's reduction runs while the GEMM goes on; with none
        it would wait for the GEMM to end, and every chunk's second shot with it."""
        self.m, self.n, self.dtype, self.reduce_sms = m, n, dtype, reduce_sms
        self.chunk_rows = chunk_rows_for(m, chunks)
        self.chunks = -(-m // self.chunk_rows)
        self.summed, self.done = self.chunks, 2 * self.chunks  # flag indices: REDUCED of chunk c is summed + c
        check_counters(group, "GEMM+AR(two-shot)", self.chunk_rows, n)
        super().__init__(group, m * n * dtype.itemsize, 2 * self.chunks + 1, "GEMM+AR(two-shot)", check=check,
                         wait_timeout=wait_timeout, graph_safe=graph_safe)  # fmt: skip
        widest = max(p.stop - p.start for p in (self._piece(c, self.rank) for c in range(self.chunks)))
        self.staging = torch.empty(self.world - 1, widest, n, dtype=dtype, device=group.device)
        if group.device.type == "cuda" and self.world <= MAX_WORLD:
            # Compile and load the one-pass sum for every piece now (their offsets may specialise
            # it apart), not inside a CUDA graph's capture; and fail here if it cannot take them.
            scratch = torch.empty(m, n, dtype=dtype, device=group.device)
            with FIRST_LAUNCHES:
                for c in range(self.chunks):
                    rows = self._piece(c, self.rank)
                    sum_parts(self._parts(rows), scratch[rows])

    def _partial(self, rank: int) -> torch.Tensor:
        return self.buffer.peer(rank, self.dtype, (self.m, self.n))

    def _piece(self, chunk: int, owner: int) -> slice:
        """The rows of ``chunk`` that rank ``owner`` sums (W near-equal pieces; some empty when
        the chunk has fewer rows than ranks)."""
        start, stop = chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.m)
        return slice(start + (stop - start) * owner // self.world, start + (stop - start) * (owner + 1) // self.world)

    def _staged(self, rank: int, rows: slice) -> torch.Tensor:
        return self.staging[(rank - self.rank - 1) % self.world][: rows.stop - rows.start]

    def _parts(self, rows: slice) -> list[torch.Tensor]:
        """Every rank's ``rows`` in rank order: this rank's partial, its peers' pulled."""
        return [self._partial(q)[rows] if q == self.rank else self._staged(q, rows) for q in range(self.world)]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self._expect_matmul(x, weight, self.m, self.n)
        r, buf = self.rank, self.buffer
        hooks = {"out": self._partial(r), "signal": SignalHook(buf.flags(r), self.chunk_rows), "status": self.status}
        capturing, plan = self._begin(x, weight, hooks, spare=self.reduce_sms)
        self._after_peers_read(self.done)  # peers finished reading my partials and sums of the last epoch
        outputs = chunk_outputs(self.m, self.n, self.chunk_rows)
        y = torch.empty(self.m, self.n, dtype=self.dtype, device=x.device)

        def reduce_piece(c: int) -> None:  # first shot: sum piece r of chunk c, publish it
            rows = self._piece(c, r)
            for q in ring(r, self.world):
                self._await(q, c, self._value(outputs[c]), f"rank {q}'s tiles of chunk {c}")
                self.lane.move([(self._staged(q, rows), self._partial(q)[rows])])
            self._await(r, c, self._value(outputs[c]), f"its own tiles of chunk {c}")
            reduce_into(self._parts(rows), "sum", y[rows])
            self.lane.move([(self._partial(r)[rows], y[rows])])  # no peer reads piece r of my partial
            self.lane.publish(buf.flags(r), self.summed + c, self._value())

        def gather_pieces(c: int) -> None:  # second shot: every peer's sum of its piece of chunk c
            for q in ring(r, self.world):
                self._await(q, self.summed + c, self._value(), f"rank {q}'s sum of its piece of chunk {c}")
                rows = self._piece(c, q)
                self.lane.move([(y[rows], self._partial(q)[rows])])

        def consume():
            for c in range(self.chunks):  # a chunk's second shot runs while the GEMM computes the next
                reduce_piece(c)
                gather_pieces(c)
            self.lane.publish(buf.flags(r), self.done, self._value())

        self.lane.alongside(consume, lambda: gemm(x, weight, plan=plan, **hooks))
        self.lane.join()
        awaited = [(q, c, outputs[c]) for q in range(self.world) for c in range(self.chunks)]
        self._finish(awaited + [(q, self.summed + c, 1) for q in range(self.world) for c in range(self.chunks)], capturing)
        return y

    def _await(self, rank: int, index: int, value: int | EpochValue, what: str) -> None:
        self.lane.wait_flag(self.buffer.flags(rank), index, value, f"{self.name} rank {self.rank}: {what}: ")
