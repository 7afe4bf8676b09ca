"""Fused overlap: one GEMM launch overlapped with its collective through symmetric memory and flags.

Needs ranks that share memory (LocalGroup, SymmetricGroup, or a one-node DistGroup) and a Triton
GEMM (a GPU, or the interpreter). Construction and ``close()`` are collective.

| operator | this rank's shapes | how |
|---|---|---|
| ``FusedAllGatherMatmul`` | x_shard_m [n, K] -> y [W*n, N] | each rank publishes its rows in its own buffer (flag r = epoch); the lane pulls every peer's rows into the local gathered buffer with copy-engine chunks, a flag per chunk; ONE GEMM waits per tile on its chunk's flag, own rows first |
| ``FusedMatmulReduceScatter`` | x [W*n, K_s] -> y_shard_m [n, N] | ONE GEMM writes its partial products into the symmetric buffer, counting finished outputs per destination block (peers' blocks first); the lane waits (stream waits, no spinning kernel) on each peer's count for this rank's block and pulls it with the copy engines while the GEMMs go on; then one local reduction in rank order |
| ``FusedMatmulAllReduce`` | x [M, K_s] -> y [M, N] | the same GEMM counting row chunks; the lane pulls every peer's chunk as soon as that peer has finished it, then reduces locally in rank order (every rank gets the same bits) |
| ``FusedMatmulAllReduceTwoShot`` | x [M, K_s] -> y [M, N] | the same GEMM counting row chunks; per chunk, each rank pulls and sums its 1/W piece of every peer's rows, publishes the sum, and pulls the peers' sums while the GEMM computes the next chunk: 2(W-1)/W of the output moved, where one-shot moves W-1 times it |
| ``FusedMatmulGroupAllReduce`` | x [M, K_s] -> y [M, N] | for ranks that share no memory (several nodes): the same GEMM counting row chunks in a private counter; the lane waits on each chunk's count and all-reduces it with the group's own all-reduce (NCCL) while the GEMM goes on |
| ``FusedAllReduceResidualNorm`` | partial [M, H] -> RMSNorm(residual + sum), residual + sum | decode (small M): each rank writes its partial into symmetric memory and raises a flag; ONE kernel per rank reads every peer's rows, sums in rank order, adds the residual and normalises |

Epochs: call e raises flags to e (signal counters to e * the chunk's outputs), so nothing is ever reset. Before a
rank overwrites its buffer for call e, every peer must have finished reading it for call e-1.

CUDA graphs: the epoch also lives on the device (``epoch_now``, advanced by a kernel on the caller's
stream each call) and the GEMM reads it there. Eagerly the lane's flags are stream memory operations
with the host's epoch; a call captured in a CUDA graph (or any call with ``graph_safe=True``) makes
them one-thread kernels reading ``epoch_now``, so each replay is the next epoch. The switch is for
good: after replays only the device knows the epoch. A replayed wait that gives up records it in
``status``; ``check()`` raises it (after replays, call it to know they completed).
"""

from __future__ import annotations

import os
import time

import torch

from interlace.engine.comm import Group, SymmetricBuffer, signals
from interlace.engine.comm.group import ring
from interlace.engine.comm.reduce import reduce_into
from interlace.engine.device import new_stream
from interlace.kernels.flags import ABORTED, FLAG_WAIT_FAILED
from interlace.kernels.reduce import MAX_WORLD
from interlace.ops import flags as epoch_flags
from interlace.ops.flags import EpochValue
from interlace.ops.gemm import (
    DEFAULT_MAX_SPINS, GEMM_WAIT_FAILED, INTERPRETING, Plan, SignalHook, WaitHook, chunk_outputs, gemm, leave_sms,
    plan_for,
)  # fmt: skip
from interlace.ops.reduce import allreduce_residual_rmsnorm, sum_parts

from .lane import SideLane
from .watchdog import WATCHDOG, log


# SMs a two-shot GEMM+AR's persistent GEMM leaves free for its reductions: a starting point, not yet measured.
REDUCE_SMS = 8


class _Fused:
    """Shared machinery: the symmetric buffer (``nbytes`` None: none, only this rank's flags), the
    lane, the epoch, the GEMM plan."""

    unseen = "the GPU is slow"  # why a call can be late with every flag it awaits raised

    def __init__(self, group: Group, nbytes: int | None, flags: int, name: str, *, check: bool, max_spins: int | None,
                 graph_safe: bool):  # fmt: skip
        self.group, self.rank, self.world = group, group.rank, group.world_size
        self.buffer = None if nbytes is None else SymmetricBuffer.allocate(group, nbytes, flags)
        self.own_flags = torch.zeros(flags, dtype=torch.int32, device=group.device) if nbytes is None else None
        self.epoch, self.check_calls, self.name, self.graph_safe = 0, check, name, graph_safe
        self.late: str | None = None  # a call the watchdog found past its deadline (check=False)
        self.epoch_now = torch.zeros(1, dtype=torch.int32, device=group.device)
        self.status = torch.zeros(4, dtype=torch.int32, device=group.device)  # a wait that gave up: see check()
        self.max_spins = max_spins if max_spins is not None else DEFAULT_MAX_SPINS
        self.lane = SideLane(group.device, group.timeout, f"{name} r{group.rank}", self.status, self.max_spins, _lane_stream(group))
        self._plans: dict[tuple, Plan] = {}
        if group.device.type == "cuda":
            epoch_flags.warm_up(group.device)

    def close(self) -> None:
        """Collective when the operator has a symmetric buffer."""
        self.lane.close()
        if self.buffer is not None:
            self.buffer.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # peers may be anywhere: no collective on an error path
            self.lane.close()
            if self.buffer is not None:
                self.buffer.abandon()

    def _flags(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s flags (without a symmetric buffer, this rank's own are all there is)."""
        return self.own_flags if self.buffer is None else self.buffer.flags(rank)

    def check(self) -> None:
        """Raise ``TimeoutError`` if a wait of this operator gave up, or a call was late (synchronises).
        A failure stays recorded: the operator's ranks no longer agree on epochs, so every later
        call fails too."""
        self._raise_late()
        failed, where, value, observed = self.status.tolist()
        who = f"rank {self.rank}: {self.name}"
        if failed == GEMM_WAIT_FAILED:
            raise TimeoutError(f"{who}: the GEMM's wait on chunk {where} timed out: expected flag >= {value}, observed {observed}")
        if failed == FLAG_WAIT_FAILED:
            raise TimeoutError(f"{self.lane.wait_name(where)} did not reach {value} (observed {observed})")
        if failed == ABORTED:
            raise TimeoutError(f"{who}: a call was stopped at its deadline ({self.lane.timeout} s); its ranks no longer agree on epochs")
        if failed:
            raise RuntimeError(f"{who}: unknown failure record {[failed, where, value, observed]}")

    def _begin(self, x: torch.Tensor | None = None, w: torch.Tensor | None = None, **plan: int) -> tuple[bool, Plan | None]:
        """Start a call on the caller's stream: whether it is being captured in a CUDA graph, and
        the plan of the GEMM of ``x`` and ``w`` (made first: tuning counts against no deadline)."""
        self._raise_late()
        capturing = self.group.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        self.graph_safe |= capturing
        chosen = self._plan(x, w, capturing=capturing, **plan) if x is not None else None
        self.lane.start_call()
        self.epoch += 1
        self.epoch_now.add_(1)  # before everything this call enqueues, on the caller's stream
        return capturing, chosen

    def _value(self, scale: int = 1, offset: int = 0) -> int | EpochValue:
        """``scale * epoch + offset`` for this call's flags: host-side, or read on the device."""
        return EpochValue(self.epoch_now, scale, offset) if self.graph_safe else self.epoch * scale + offset

    def _finish(self, awaited: list[tuple[int, int, int]], capturing: bool) -> None:
        """Eagerly on a GPU, where stream waits have no deadline of their own: with ``check``, block
        the host until this call's work is done, or raise naming every awaited (rank, flag, scale)
        still below ``scale * epoch``, then raise what ``status`` records; without, have the
        watchdog say the same if the work is not done by the deadline (the next call raises it)."""
        if capturing:
            return
        gpu, epoch = self.group.device.type == "cuda", self.epoch
        done = torch.cuda.current_stream(self.group.device).record_event() if gpu else None
        if not self.check_calls:
            if gpu:
                WATCHDOG.watch(self, done.query, self.lane.deadline, lambda: self._report_late(awaited, epoch, done.query))
            return
        while gpu and not done.query():
            if time.monotonic() > self.lane.deadline:
                # Recorded for good: the streams stay blocked behind the call, so a later call (or
                # check(), whose read would queue behind them) must raise at once, not wait.
                self.late = self._behind(awaited, epoch)
                raise TimeoutError(self.late)
            time.sleep(1e-4)
        self.check()

    def _report_late(self, awaited: list[tuple[int, int, int]], epoch: int, done) -> bool:
        """(The watchdog's thread) log and record a late call, unless it has just finished; whether
        it did. The failure is recorded before the flags are read: a read could queue behind
        blocked work, or fail."""
        if self.late is not None:
            return True
        if done():
            return False
        by = " (a call made with check=False, reported by the watchdog)"
        self.late = self._late(epoch) + by
        log.error(self.late + "; reading the flags it waits on")
        self.late = self._behind(awaited, epoch) + by
        log.error(self.late)
        return True

    def _raise_late(self) -> None:
        if self.late is not None:
            raise TimeoutError(self.late)

    def _behind(self, awaited: list[tuple[int, int, int]], epoch: int) -> str:
        """What call ``epoch`` (host-side; graph-safe operators read the device's) waits for."""
        try:
            epoch = signals.read(self.epoch_now, 0) if self.graph_safe else epoch
            seen = [(q, i, signals.read(self._flags(q), i), signals.wrap(epoch * s)) for q, i, s in awaited]  # one read each
        except TimeoutError as error:  # the reads queue behind the blocked work
            return f"{self._late(epoch)}; its flags cannot be read: {error}"
        behind = [f"rank {q} flag {i} is {value}, needs {target}" for q, i, value, target in seen if signals.wrap(value - target) < 0]
        return f"{self._late(epoch)}; behind: {'; '.join(behind) or f'nothing this rank can see ({self.unseen})'}"

    def _late(self, epoch: int) -> str:
        return f"rank {self.rank}: {self.name} epoch {epoch} did not finish within {self.lane.timeout} s"

    def _plan(self, x: torch.Tensor, w: torch.Tensor, *, capturing: bool, waits: bool = False, spare: int = 0) -> Plan:
        """The GEMM's plan. Rank threads sharing one GPU split its multiprocessors, so that every
        rank's persistent GEMM is resident at once (a waiting kernel must not starve its producer).
        It leaves an SM per lane on the GPU for the lanes' kernels: graph-safe flag kernels (which a
        waiting GEMM needs, and which overlap the GEMM only if resident beside it), and, for a GEMM
        that ``waits``, the copies it waits for, which the driver may run on SMs when same-device;
        and ``spare`` more (a collective's kernels).
        On a GPU the first for a shape (eager: it may tune) ends in a barrier, so that no rank's
        kernels run while a peer times its own; never under capture (tuning cannot be captured)."""
        shape = (tuple(x.shape), tuple(w.shape), x.dtype)
        key = (*shape, waits, spare, self.graph_safe)
        if key not in self._plans:
            sharing = self.world if hasattr(self.group, "share") else 1
            lanes = sharing if self.graph_safe or waits else 0
            self._plans[key] = leave_sms(plan_for(x, w), x.device, lanes + spare, sharing)
            if x.is_cuda and not capturing and not any(k[:3] == shape for k in self._plans if k != key):
                self.group.barrier()
        return self._plans[key]

    def _after_peers_read(self, index: int) -> None:
        """Block writes to this rank's buffer until every peer's ``flags[index]`` >= epoch - 1."""
        if self.epoch == 1 and not self.graph_safe:
            return
        value, buf = self._value(1, -1), self.buffer

        def wait():
            for q in ring(self.rank, self.world):
                self.lane.wait_flag(buf.flags(q), index, value, f"{self.name} rank {self.rank}: rank {q} finishing its last call: ")

        self.lane.after_current_stream()
        self.lane.run(wait)
        self.lane.join()


def _chunk_rows(m: int, chunks: int) -> int:
    """Rows per chunk for at most ``chunks`` chunks of ``m`` rows (the last may be shorter)."""
    return -(-m // max(1, min(chunks, m)))


def _lane_stream(group: Group) -> torch.cuda.Stream | None:
    """One lane stream per rank, shared by its fused operators (their calls never interleave): with
    a lane per operator, rank threads on one GPU would soon have more streams than the device has
    hardware queues (CUDA_DEVICE_MAX_CONNECTIONS, at most 32), and streams sharing a queue wait for
    each other's stream waits."""
    if group.device.type != "cuda":
        return None
    if "_fused_lane" not in group.__dict__:
        group.__dict__["_fused_lane"] = new_stream(group.device)
    return group.__dict__["_fused_lane"]


class FusedAllGatherMatmul(_Fused):
    """``y = all_gather(x_shard_m) @ w.T (+ bias)`` with x_shard_m ``[rows, k]`` per rank."""

    def __init__(self, group: Group, rows: int, k: int, dtype: torch.dtype, *, check: bool = True, max_spins: int | None = None,
                 graph_safe: bool = False):  # fmt: skip
        self.rows, self.k, self.dtype = rows, k, dtype
        super().__init__(group, group.world_size * rows * k * dtype.itemsize, group.world_size, "AG+GEMM",
                         check=check, max_spins=max_spins, graph_safe=graph_safe)  # fmt: skip

    def _gathered(self, rank: int) -> torch.Tensor:
        return self.buffer.peer(rank, self.dtype, (self.world, self.rows, self.k))

    def __call__(self, x_shard_m: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[all_gather(x_shard_m) @ w.T for w in weights]``: the first GEMM overlaps the gather,
        the others reuse the gathered rows."""
        _expect(x_shard_m, (self.rows, self.k), self.dtype, self.rank, "AG+GEMM x_shard_m")
        r, buf = self.rank, self.buffer
        mine = self._gathered(r)
        x = mine.view(self.world * self.rows, self.k)
        capturing, plan = self._begin(x, weights[0], waits=True)
        value = self._value()
        self._after_peers_read(r)  # peers hold copies of my rows of the last epoch before I overwrite them

        def publish_and_pull():
            self.lane.copy([(mine[r], x_shard_m.contiguous())], buf.flags(r), [r], value)
            for q in ring(self.rank, self.world):
                self.lane.wait_flag(buf.flags(q), q, value, f"AG+GEMM rank {r}: rank {q}'s rows: ")
                self.lane.copy([(mine[q], self._gathered(q)[q])], buf.flags(r), [q], value)

        self.lane.after_current_stream()
        self.lane.run(publish_and_pull)  # queued before the GEMM: the GEMM spins on these copies' flags
        hook = WaitHook(buf.flags(r), self.epoch_now, self.rows, label=f"AG+GEMM rank {r}")
        ys = [gemm(x, weights[0], wait=hook, start_chunk=r, plan=plan, max_spins=self.max_spins, check=False, status=self.status)]
        self.lane.join()
        self._finish([(q, q, 1) for q in range(self.world)], capturing)
        return ys + [x @ w.T for w in weights[1:]]


class _MatmulThenReduce(_Fused):
    """GEMM into the symmetric buffer, counting finished outputs per row chunk; the lane pulls each
    peer's chunk of the rows ``reduced`` with the copy engines (no SMs: a persistent GEMM holds them)
    as soon as that peer has finished it, then reduces them locally in rank order, one pass over the
    parts. The reduction follows every pull on the lane: a kernel queued between pulls would wait
    for SMs the GEMM holds, and hold back the pulls behind it. ``staging`` holds the pulled rows:
    ``world - 1`` copies of this rank's output. Flags: one signal counter per chunk, then DONE (this
    rank finished reading its peers)."""

    def __init__(self, group, m, n, dtype, chunk_rows, reduced: slice, name, *, check, max_spins, graph_safe):
        self.m, self.n, self.dtype, self.chunk_rows, self.reduced = m, n, dtype, chunk_rows, reduced
        self.chunks = self.done = -(-m // chunk_rows)
        super().__init__(group, m * n * dtype.itemsize, self.chunks + 1, name, check=check, max_spins=max_spins, graph_safe=graph_safe)
        self.staging = torch.empty(self.world - 1, reduced.stop - reduced.start, n, dtype=dtype, device=group.device)
        if group.device.type == "cuda" and self.world <= MAX_WORLD:
            # Compile and load the one-pass sum now, not inside a CUDA graph's capture; and fail
            # here, not fall back to torch's pass per rank, if it cannot take these operands.
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
        _expect(x, (self.m, x.shape[1]), self.dtype, self.rank, f"{self.name} x")
        capturing, plan = self._begin(x, weight)
        buf, r, reduced = self.buffer, self.rank, self.reduced
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
            for c in mine:
                self._await(r, c, outputs[c])
            reduce_into(self._parts(), "sum", out)

        def produce():
            gemm(x, weight, out=self._partial(r), signal=SignalHook(buf.flags(r), self.chunk_rows),
                 start_chunk=start_chunk, plan=plan, max_spins=self.max_spins, status=self.status)  # fmt: skip

        self.lane.alongside(consume, produce)
        self.lane.join()
        self._finish([(q, c, outputs[c]) for q in range(self.world) for c in mine], capturing)
        return out

    def _await(self, rank: int, chunk: int, outputs: int) -> None:
        what = f"{self.name} rank {self.rank}: rank {rank}'s tiles of chunk {chunk}: "
        self.lane.wait_flag(self.buffer.flags(rank), chunk, self._value(outputs), what)


class FusedMatmulReduceScatter(_MatmulThenReduce):
    """``y_shard_m = reduce_scatter(x @ w.T)`` over rows: x ``[W*rows, k_shard]``, y ``[rows, n]``."""

    def __init__(self, group: Group, rows: int, n: int, dtype: torch.dtype, *, check: bool = True, max_spins: int | None = None,
                 graph_safe: bool = False):  # fmt: skip
        mine = slice(group.rank * rows, (group.rank + 1) * rows)
        super().__init__(group, group.world_size * rows, n, dtype, rows, mine, "GEMM+RS", check=check, max_spins=max_spins,
                         graph_safe=graph_safe)  # fmt: skip

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r, w = self.rank, self.world
        # Rank q produces blocks from q + 1 on, around the ring: rank r - 1 finishes block r first,
        # and every rank finishes its own block last.
        return self._run(x, weight, (r + 1) % w, [(r - 1 - p) % w for p in range(w - 1)])


class FusedMatmulAllReduce(_MatmulThenReduce):
    """``y = all_reduce(x @ w.T)``: x ``[m, k_shard]``, y ``[m, n]``, pulled in ``chunks`` row chunks."""

    def __init__(self, group: Group, m: int, n: int, dtype: torch.dtype, chunks: int = 4, *, check: bool = True,
                 max_spins: int | None = None, graph_safe: bool = False):  # fmt: skip
        super().__init__(group, m, n, dtype, _chunk_rows(m, chunks), slice(0, m), "GEMM+AR", check=check, max_spins=max_spins,
                         graph_safe=graph_safe)  # fmt: skip

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._run(x, weight, 0, ring(self.rank, self.world))  # every rank goes chunk by chunk


class FusedMatmulAllReduceTwoShot(_Fused):
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
                 max_spins: int | None = None, graph_safe: bool = False, reduce_sms: int = REDUCE_SMS):  # fmt: skip
        """``reduce_sms``: SMs the persistent GEMM leaves free on its GPU (shared by the ranks of a
        LocalGroup on one GPU), where each chunk's reduction runs while the GEMM goes on; with none
        it would wait for the GEMM to end, and every chunk's second shot with it."""
        self.m, self.n, self.dtype, self.reduce_sms = m, n, dtype, reduce_sms
        self.chunk_rows = _chunk_rows(m, chunks)
        self.chunks = -(-m // self.chunk_rows)
        self.summed, self.done = self.chunks, 2 * self.chunks  # flag indices: REDUCED of chunk c is summed + c
        super().__init__(group, m * n * dtype.itemsize, 2 * self.chunks + 1, "GEMM+AR(two-shot)", check=check,
                         max_spins=max_spins, graph_safe=graph_safe)  # fmt: skip
        widest = max(p.stop - p.start for p in (self._piece(c, self.rank) for c in range(self.chunks)))
        self.staging = torch.empty(self.world - 1, widest, n, dtype=dtype, device=group.device)
        if group.device.type == "cuda" and self.world <= MAX_WORLD:
            # Compile and load the one-pass sum for every piece now (their offsets may specialise
            # it apart), not inside a CUDA graph's capture; and fail here if it cannot take them.
            scratch = torch.empty(m, n, dtype=dtype, device=group.device)
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
        _expect(x, (self.m, x.shape[1]), self.dtype, self.rank, f"{self.name} x")
        capturing, plan = self._begin(x, weight, spare=self.reduce_sms)
        r, buf = self.rank, self.buffer
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

        def produce():
            gemm(x, weight, out=self._partial(r), signal=SignalHook(buf.flags(r), self.chunk_rows), plan=plan,
                 max_spins=self.max_spins, status=self.status)  # fmt: skip

        self.lane.alongside(consume, produce)
        self.lane.join()
        awaited = [(q, c, outputs[c]) for q in range(self.world) for c in range(self.chunks)]
        self._finish(awaited + [(q, self.summed + c, 1) for q in range(self.world) for c in range(self.chunks)], capturing)
        return y

    def _await(self, rank: int, index: int, value: int | EpochValue, what: str) -> None:
        self.lane.wait_flag(self.buffer.flags(rank), index, value, f"{self.name} rank {self.rank}: {what}: ")


class FusedMatmulGroupAllReduce(_Fused):
    """``y = all_reduce(x @ w.T)`` where ranks share no memory (several nodes): x ``[m, k_shard]``,
    y ``[m, n]``. ONE GEMM counts finished outputs per row chunk; the lane all-reduces each chunk
    with the group's own all-reduce (NCCL on GPUs) once this rank has finished it, while the GEMM
    goes on with the next. Every rank goes chunk by chunk, so the all-reduces pair up."""

    unseen = "the GPU is slow, or a peer has not joined the group's all-reduce of a chunk"

    def __init__(self, group: Group, m: int, n: int, dtype: torch.dtype, chunks: int = 4, *, check: bool = True,
                 max_spins: int | None = None, graph_safe: bool = False, collective_sms: int = 8):  # fmt: skip
        """``collective_sms``: SMs the persistent GEMM leaves free, where the group's all-reduce
        kernels (NCCL's, a block per channel) run beside it; with none they would wait for the
        GEMM to end. 8 is a starting point, not yet measured."""
        self.m, self.n, self.dtype, self.collective_sms = m, n, dtype, collective_sms
        self.chunk_rows = _chunk_rows(m, chunks)
        self.chunks = -(-m // self.chunk_rows)
        super().__init__(group, None, self.chunks, "GEMM+AR(group)", check=check, max_spins=max_spins, graph_safe=graph_safe)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        _expect(x, (self.m, x.shape[1]), self.dtype, self.rank, f"{self.name} x")
        capturing, plan = self._begin(x, weight, spare=self.collective_sms)
        outputs = chunk_outputs(self.m, self.n, self.chunk_rows)
        y = torch.empty(self.m, self.n, dtype=self.dtype, device=x.device)

        def all_reduce_chunks():
            for c in range(self.chunks):
                what = f"{self.name} rank {self.rank}: its own tiles of chunk {c}: "
                self.lane.wait_flag(self.own_flags, c, self._value(outputs[c]), what)
                rows = y[c * self.chunk_rows : (c + 1) * self.chunk_rows]
                self.group.all_reduce(rows, out=rows)

        def produce():
            gemm(x, weight, out=y, signal=SignalHook(self.own_flags, self.chunk_rows), plan=plan, max_spins=self.max_spins,
                 status=self.status)  # fmt: skip

        self.lane.alongside(all_reduce_chunks, produce)
        self.lane.join()
        self._finish([(self.rank, c, outputs[c]) for c in range(self.chunks)], capturing)
        return y


class FusedAllReduceResidualNorm(_Fused):
    """Decode's row-parallel epilogue: ``h = residual + all_reduce(partial)``, ``out = RMSNorm(h) * weight``.
    Returns ``(out, h)``; every rank gets the same bits."""

    def __init__(self, group: Group, rows: int, hidden: int, dtype: torch.dtype, eps: float = 1e-5, *, check: bool = True,
                 graph_safe: bool = False):  # fmt: skip
        if group.world_size > MAX_WORLD:
            raise ValueError(f"rank {group.rank}: the fused all-reduce reads at most {MAX_WORLD} peers, "
                             f"the group has {group.world_size}")  # fmt: skip
        self.rows, self.hidden, self.dtype, self.eps = rows, hidden, dtype, eps
        super().__init__(group, rows * hidden * dtype.itemsize, 2, "AR+norm", check=check, max_spins=None, graph_safe=graph_safe)
        if group.device.type == "cuda":  # compile and load the kernel now, not inside a CUDA graph's capture
            scratch = torch.zeros(rows, hidden, dtype=dtype, device=group.device)
            allreduce_residual_rmsnorm([scratch] * self.world, scratch, scratch[0], eps)

    def __call__(self, residual: torch.Tensor, weight: torch.Tensor, partial: torch.Tensor):
        for name, t in (("residual", residual), ("partial", partial)):
            _expect(t, (self.rows, self.hidden), self.dtype, self.rank, f"AR+norm {name}")
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


_SHARED = {"ag_gemm": FusedAllGatherMatmul, "gemm_rs": FusedMatmulReduceScatter, "gemm_ar": FusedMatmulAllReduce,
           "ar_norm": FusedAllReduceResidualNorm}  # fmt: skip
_UNSHARED = {"gemm_ar": FusedMatmulGroupAllReduce}  # what runs where ranks share no memory


def workspace(group: Group, pattern: str, *shape, check: bool = True, shots: int = 1) -> _Fused:
    """The fused operator for ``pattern`` and this shape on ``group``, made (collectively: every rank
    reaches it with the same shape) on first use and kept with the group; ``check`` applies to the
    calls that follow. ``shots``: 2 makes GEMM+AR two-shot (other patterns have one way only)."""
    table = group.__dict__.setdefault("_fused_workspaces", {})
    shots = shots if pattern == "gemm_ar" else 1
    key = (pattern, *shape, shots)
    if key not in table:
        reason = fused_unavailable(group, pattern, shots=shots)
        if reason is not None:
            raise RuntimeError(f"rank {group.rank}: overlap='fused' cannot run here: {reason}")
        kind = _SHARED[pattern] if _no_shared_memory(group) is None else _UNSHARED[pattern]
        table[key] = (FusedMatmulAllReduceTwoShot if shots == 2 else kind)(group, *shape, check=check)
    table[key].check_calls = check
    return table[key]


def check_workspaces(group: Group) -> None:
    """Raise what any fused operator made for ``group`` recorded: after CUDA-graph replays, which
    never block the host, this says whether they completed (synchronises)."""
    for op in group.__dict__.get("_fused_workspaces", {}).values():
        op.check()


def close_workspaces(group: Group) -> None:
    """Collective: release every fused operator made for ``group``, in one order on every rank."""
    table = group.__dict__.pop("_fused_workspaces", {})
    for key in sorted(table, key=repr):
        table[key].close()


def fused_unavailable(group: Group, pattern: str, *, timing: bool = False, shots: int = 1) -> str | None:
    """Why fused ``pattern`` (two-shot GEMM+AR with ``shots=2``) cannot run (or, with ``timing``,
    cannot be timed meaningfully) on ``group``."""
    if not (INTERPRETING or torch.cuda.is_available()):
        return "Triton needs a GPU (TRITON_INTERPRET=1 runs kernels on CPU, for tests)"
    if group.device.type != "cuda" and not INTERPRETING:
        return (f"the group's tensors are on {group.device} and Triton runs kernels on the GPU "
                "(TRITON_INTERPRET=1, set before Triton is imported, runs them on CPU, for tests)")  # fmt: skip
    if timing and INTERPRETING:
        return "under the Triton interpreter a timing measures Python, not a kernel"
    if pattern == "ar_norm" and group.world_size > MAX_WORLD:
        return f"the fused all-reduce + RMSNorm reads at most {MAX_WORLD} ranks, the group has {group.world_size}"
    reason = _no_shared_memory(group)
    if reason is not None and shots == 2:
        return (f"two-shot fused gemm_ar needs memory shared by every rank: {reason}; across nodes fused gemm_ar runs "
                "over the group's all-reduce, whose algorithm the transport picks (use shots=1)")  # fmt: skip
    return None if reason is None or pattern in _UNSHARED else f"fused {pattern} needs memory shared by every rank: {reason}"


def _no_shared_memory(group: Group) -> str | None:
    """Why ``group``'s ranks may not share memory, or None when they do."""
    if hasattr(group, "share") or type(group).__name__ == "SymmetricGroup":
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if local == group.world_size:
        return None
    return f"{type(group).__name__} ranks may span nodes (LOCAL_WORLD_SIZE={local or 'unset'}, world {group.world_size})"


def _expect(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, rank: int, what: str) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"rank {rank}: {what} must be {str(dtype).removeprefix('torch.')}{list(shape)}, "
                         f"got {str(t.dtype).removeprefix('torch.')}{list(t.shape)}")  # fmt: skip
