"""Fused overlap: one GEMM launch overlapped with its collective through symmetric memory and flags.

Needs ranks that share memory (LocalGroup, SymmetricGroup, or a one-node DistGroup) and a Triton
GEMM (a GPU, or the interpreter). Construction and ``close()`` are collective.

| operator | this rank's shapes | how |
|---|---|---|
| ``FusedAllGatherMatmul`` | x_shard_m [n, K] -> y [W*n, N] | each rank publishes its rows in its own buffer (flag r = epoch); the lane pulls every peer's rows into the local gathered buffer with copy-engine chunks, a flag per chunk; ONE GEMM waits per tile on its chunk's flag, own rows first |
| ``FusedMatmulReduceScatter`` | x [W*n, K_s] -> y_shard_m [n, N] | ONE GEMM writes its partial products into the symmetric buffer, counting finished tiles per destination block; the lane waits (stream waits, no spinning kernel) on every peer's count for this rank's block, then reduces the blocks in rank order |
| ``FusedMatmulAllReduce`` | x [M, K_s] -> y [M, N] | the same GEMM counting row chunks; the lane reduces each chunk over all ranks as soon as all have finished it (a one-shot all-reduce per chunk) |
| ``FusedAllReduceResidualNorm`` | partial [M, H] -> RMSNorm(residual + sum), residual + sum | decode (small M): each rank writes its partial into symmetric memory and raises a flag; ONE kernel per rank reads every peer's rows, sums in rank order, adds the residual and normalises |

Epochs: call e raises flags to e (tile counters to e * tiles), so nothing is ever reset. Before a
rank overwrites its buffer for call e, every peer must have finished reading it for call e-1.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from interlace.engine.comm import Group, SymmetricBuffer, signals
from interlace.engine.comm.group import ring
from interlace.engine.comm.reduce import reduce_in_rank_order
from interlace.kernels import allreduce_norm
from interlace.ops.gemm import DEFAULT_MAX_SPINS, INTERPRETER_LOCK, INTERPRETING, Plan, SignalHook, WaitHook, gemm, plan_for

from .lane import SideLane


class _Fused:
    """Shared machinery: the symmetric buffer, the lane, the epoch, the GEMM plan."""

    def __init__(self, group: Group, nbytes: int, flags: int, name: str, *, check: bool, max_spins: int | None):
        self.group, self.rank, self.world = group, group.rank, group.world_size
        self.buffer = SymmetricBuffer.allocate(group, nbytes, flags)
        self.lane = SideLane(group.device, group.timeout, f"{name} r{group.rank}")
        self.epoch, self.check, self.name = 0, check, name
        self.max_spins = max_spins if max_spins is not None else DEFAULT_MAX_SPINS
        self._plans: dict[tuple, Plan] = {}

    def close(self) -> None:
        """Collective."""
        self.lane.close()
        self.buffer.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # peers may be anywhere: no collective on an error path
            self.lane.close()
            self.buffer.abandon()

    def _finish(self, expected: list[tuple[int, int, int]]) -> None:
        """With ``check`` on a GPU (stream waits have no deadline of their own): block the host until
        this call's work is done, or raise naming every (rank, flag) still below its target."""
        if not self.check or self.group.device.type != "cuda":
            return
        done = torch.cuda.current_stream(self.group.device).record_event()
        while not done.query():
            if time.monotonic() > self.lane.deadline:
                behind = [f"rank {q} flag {i} is {signals.read(self.buffer.flags(q), i)}, needs {signals.wrap(t)}"
                          for q, i, t in expected if signals.wrap(signals.read(self.buffer.flags(q), i) - t) < 0]  # fmt: skip
                raise TimeoutError(f"rank {self.rank}: {self.name} epoch {self.epoch} did not finish within "
                                   f"{self.lane.timeout} s; behind: {'; '.join(behind) or 'nothing (the GPU is slow)'}")  # fmt: skip
            time.sleep(1e-4)

    def _refuse_graph_capture(self) -> None:
        """Epochs live on the host and stream waits take immediate values: a captured graph would
        replay stale epochs and wait for nothing. Refuse, rather than compute garbage on replay."""
        if self.group.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"rank {self.rank}: {self.name} cannot be captured in a CUDA graph yet (its epochs are "
                               "host-side); run it eagerly, or use overlap='chunked' inside graphs")  # fmt: skip

    def _plan(self, x: torch.Tensor, w: torch.Tensor) -> Plan:
        """The GEMM's plan; rank threads sharing one GPU split its multiprocessors, so that every
        rank's persistent GEMM is resident at once (a waiting kernel must not starve its producer)."""
        key = (tuple(x.shape), tuple(w.shape), x.dtype)
        if key not in self._plans:
            plan = plan_for(x, w)
            if hasattr(self.group, "share") and x.is_cuda:
                plan = dataclasses.replace(plan, programs=max(1, plan.programs // self.world))
            self._plans[key] = plan
        return self._plans[key]

    def _after_peers_read(self, index: int) -> None:
        """Block writes to this rank's buffer until every peer's ``flags[index]`` >= epoch - 1."""
        if self.epoch == 0:
            return
        e, buf = self.epoch, self.buffer

        def wait():
            for q in ring(self.rank, self.world):
                self.lane.wait_flag(buf.flags(q), index, e, f"{self.name} rank {self.rank}: rank {q} finishing epoch {e}: ")

        self.lane.after_current_stream()
        self.lane.run(wait)
        self.lane.join()


class FusedAllGatherMatmul(_Fused):
    """``y = all_gather(x_shard_m) @ w.T (+ bias)`` with x_shard_m ``[rows, k]`` per rank."""

    def __init__(self, group: Group, rows: int, k: int, dtype: torch.dtype, *, check: bool = True, max_spins: int | None = None):
        self.rows, self.k, self.dtype = rows, k, dtype
        super().__init__(group, group.world_size * rows * k * dtype.itemsize, group.world_size, "AG+GEMM",
                         check=check, max_spins=max_spins)  # fmt: skip

    def _gathered(self, rank: int) -> torch.Tensor:
        return self.buffer.peer(rank, self.dtype, (self.world, self.rows, self.k))

    def __call__(self, x_shard_m: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[all_gather(x_shard_m) @ w.T for w in weights]``: the first GEMM overlaps the gather,
        the others reuse the gathered rows."""
        _expect(x_shard_m, (self.rows, self.k), self.dtype, self.rank, "AG+GEMM x_shard_m")
        r, buf = self.rank, self.buffer
        self._refuse_graph_capture()
        self.lane.start_call()
        self._after_peers_read(r)  # peers hold copies of my rows of the last epoch before I overwrite them
        self.epoch += 1
        e, mine = self.epoch, self._gathered(r)

        def publish_and_pull():
            self.lane.copy([(mine[r], x_shard_m.contiguous())], buf.flags(r), [r], e)
            for q in ring(self.rank, self.world):
                self.lane.wait_flag(buf.flags(q), q, e, f"AG+GEMM rank {r}: rank {q}'s rows of epoch {e}: ")
                self.lane.copy([(mine[q], self._gathered(q)[q])], buf.flags(r), [q], e)

        self.lane.after_current_stream()
        self.lane.run(publish_and_pull)  # queued before the GEMM: the GEMM spins on these copies' flags
        x = mine.view(self.world * self.rows, self.k)
        hook = WaitHook(buf.flags(r), e, self.rows, label=f"AG+GEMM rank {r}")
        ys = [gemm(x, weights[0], wait=hook, start_chunk=r, plan=self._plan(x, weights[0]), max_spins=self.max_spins, check=self.check)]
        self.lane.join()
        return ys + [x @ w.T for w in weights[1:]]


class _MatmulThenReduce(_Fused):
    """GEMM into the symmetric buffer counting tiles per chunk; the lane reduces chunks over ranks.
    Flags: ``chunks`` tile counters, then DONE (this rank finished reading its peers)."""

    def __init__(self, group, m, n, dtype, chunks, name, *, check, max_spins):
        self.m, self.n, self.dtype, self.chunks = m, n, dtype, chunks
        self.done = chunks
        super().__init__(group, m * n * dtype.itemsize, chunks + 1, name, check=check, max_spins=max_spins)

    def _partial(self, rank: int) -> torch.Tensor:
        return self.buffer.peer(rank, self.dtype, (self.m, self.n))

    def _run(self, x: torch.Tensor, weight: torch.Tensor, chunk_rows: int, start_chunk: int, reduce_chunks) -> None:
        _expect(x, (self.m, x.shape[1]), self.dtype, self.rank, f"{self.name} x")
        self._refuse_graph_capture()
        self.lane.start_call()
        self._after_peers_read(self.done)  # peers finished reading my partials of the last epoch
        self.epoch += 1
        e, buf, plan = self.epoch, self.buffer, self._plan(x, weight)
        targets = [e * t for t in plan.tiles_per_chunk(self.m, self.n, chunk_rows)]

        def consume():
            reduce_chunks(e, targets)
            self.lane.publish(buf.flags(self.rank), self.done, e)

        def produce():
            gemm(x, weight, out=self._partial(self.rank), signal=SignalHook(buf.flags(self.rank), chunk_rows),
                 start_chunk=start_chunk, plan=plan, max_spins=self.max_spins)  # fmt: skip

        self.lane.alongside(consume, produce)
        self.lane.join()
        self._finish([(q, c, targets[c]) for q in range(self.world) for c in self._awaited_chunks()])

    def _awaited_chunks(self) -> list[int]:
        return list(range(self.chunks))

    def _await_chunk(self, chunk: int, target: int, e: int) -> None:
        for q in range(self.world):
            what = f"{self.name} rank {self.rank}: rank {q}'s tiles of chunk {chunk}, epoch {e}: "
            self.lane.wait_flag(self.buffer.flags(q), chunk, target, what)


class FusedMatmulReduceScatter(_MatmulThenReduce):
    """``y_shard_m = reduce_scatter(x @ w.T)`` over rows: x ``[W*rows, k_shard]``, y ``[rows, n]``."""

    def __init__(self, group: Group, rows: int, n: int, dtype: torch.dtype, *, check: bool = True, max_spins: int | None = None):
        self.rows = rows
        super().__init__(group, group.world_size * rows, n, dtype, group.world_size, "GEMM+RS", check=check, max_spins=max_spins)

    def _awaited_chunks(self) -> list[int]:
        return [self.rank]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r, n = self.rank, self.rows
        out = torch.empty(n, self.n, dtype=self.dtype, device=x.device)

        def reduce_mine(e: int, targets: list[int]) -> None:
            self._await_chunk(r, targets[r], e)
            out.copy_(reduce_in_rank_order([self._partial(q)[r * n : (r + 1) * n] for q in range(self.world)], "sum"))

        # Destination blocks are produced starting after this rank's own, so peers' blocks finish first.
        self._run(x, weight, n, (r + 1) % self.world, reduce_mine)
        return out


class FusedMatmulAllReduce(_MatmulThenReduce):
    """``y = all_reduce(x @ w.T)``: x ``[m, k_shard]``, y ``[m, n]``, reduced in ``chunks`` row chunks."""

    def __init__(self, group: Group, m: int, n: int, dtype: torch.dtype, chunks: int = 4, *, check: bool = True,
                 max_spins: int | None = None):  # fmt: skip
        self.chunk_rows = -(-m // max(1, min(chunks, m)))
        super().__init__(group, m, n, dtype, -(-m // self.chunk_rows), "GEMM+AR", check=check, max_spins=max_spins)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.m, self.n, dtype=self.dtype, device=x.device)
        step = self.chunk_rows

        def reduce_each(e: int, targets: list[int]) -> None:
            for c in range(self.chunks):
                self._await_chunk(c, targets[c], e)
                rows = slice(c * step, min((c + 1) * step, self.m))
                out[rows] = reduce_in_rank_order([self._partial(q)[rows] for q in range(self.world)], "sum")

        self._run(x, weight, step, 0, reduce_each)
        return out


class FusedAllReduceResidualNorm(_Fused):
    """Decode's row-parallel epilogue: ``h = residual + all_reduce(partial)``, ``out = RMSNorm(h) * weight``.
    Returns ``(out, h)``; every rank gets the same bits."""

    def __init__(self, group: Group, rows: int, hidden: int, dtype: torch.dtype, *, eps: float = 1e-5, check: bool = True):
        if group.world_size > allreduce_norm.MAX_WORLD:
            raise ValueError(f"rank {group.rank}: the fused all-reduce reads at most {allreduce_norm.MAX_WORLD} peers, "
                             f"the group has {group.world_size}")  # fmt: skip
        self.rows, self.hidden, self.dtype, self.eps = rows, hidden, dtype, eps
        super().__init__(group, rows * hidden * dtype.itemsize, 2, "AR+norm", check=check, max_spins=None)

    def __call__(self, residual: torch.Tensor, weight: torch.Tensor, partial: torch.Tensor):
        for name, t in (("residual", residual), ("partial", partial)):
            _expect(t, (self.rows, self.hidden), self.dtype, self.rank, f"AR+norm {name}")
        ready, done, buf = 0, 1, self.buffer
        self._refuse_graph_capture()
        self.lane.start_call()
        self._after_peers_read(done)  # peers finished reading my partial of the last epoch
        self.epoch += 1
        e = self.epoch
        peers = [self.buffer.peer(q, self.dtype, (self.rows, self.hidden)) for q in range(self.world)]

        def publish_and_gather():
            peers[self.rank].copy_(partial)
            self.lane.publish(buf.flags(self.rank), ready, e)
            for q in ring(self.rank, self.world):
                self.lane.wait_flag(buf.flags(q), ready, e, f"AR+norm rank {self.rank}: rank {q}'s partial of epoch {e}: ")

        self.lane.after_current_stream()
        self.lane.run(publish_and_gather)
        self.lane.join()
        residual, weight = residual.contiguous(), weight.contiguous()
        out, h = torch.empty_like(residual), torch.empty_like(residual)
        pointers = peers + [peers[0]] * (allreduce_norm.MAX_WORLD - self.world)  # unused beyond WORLD
        with INTERPRETER_LOCK:
            allreduce_norm.allreduce_residual_rmsnorm_kernel[(self.rows,)](
                *pointers, residual, weight, out, h, self.hidden, peers[0].stride(0), residual.stride(0), out.stride(0), self.eps,
                WORLD=self.world, BLOCK=allreduce_norm.block_for(self.hidden),
            )  # fmt: skip
        self.lane.after_current_stream()
        self.lane.run(lambda: self.lane.publish(buf.flags(self.rank), done, e))
        self.lane.join()
        self._finish([(q, ready, e) for q in range(self.world)])
        return out, h


_KINDS = {"ag_gemm": FusedAllGatherMatmul, "gemm_rs": FusedMatmulReduceScatter, "gemm_ar": FusedMatmulAllReduce}


def workspace(group: Group, pattern: str, *shape, check: bool = True) -> _Fused:
    """The fused operator for ``pattern`` and this shape on ``group``, made (collectively: every rank
    reaches it with the same shape) on first use and kept with the group."""
    table = group.__dict__.setdefault("_fused_workspaces", {})
    key = (pattern, *shape, check)
    if key not in table:
        reason = fused_unavailable(group)
        if reason is not None:
            raise RuntimeError(f"rank {group.rank}: overlap='fused' cannot run here: {reason}")
        table[key] = _KINDS[pattern](group, *shape, check=check)
    return table[key]


def close_workspaces(group: Group) -> None:
    """Collective: release every fused operator made for ``group``, in one order on every rank."""
    table = group.__dict__.pop("_fused_workspaces", {})
    for key in sorted(table, key=repr):
        table[key].close()


def fused_unavailable(group: Group, *, timing: bool = False) -> str | None:
    """Why fused overlap cannot run (or, with ``timing``, cannot be timed meaningfully) on ``group``."""
    if not (INTERPRETING or torch.cuda.is_available()):
        return "Triton needs a GPU (TRITON_INTERPRET=1 runs kernels on CPU, for tests)"
    if timing and INTERPRETING:
        return "under the Triton interpreter a timing measures Python, not a kernel"
    if hasattr(group, "share") or type(group).__name__ == "SymmetricGroup":
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if local == group.world_size:
        return None
    return (f"{type(group).__name__} ranks may span nodes (LOCAL_WORLD_SIZE={local or 'unset'}, world {group.world_size}); "
            "fused needs memory shared by every rank")  # fmt: skip


def _expect(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, rank: int, what: str) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"rank {rank}: {what} must be {str(dtype).removeprefix('torch.')}{list(shape)}, "
                         f"got {str(t.dtype).removeprefix('torch.')}{list(t.shape)}")  # fmt: skip
