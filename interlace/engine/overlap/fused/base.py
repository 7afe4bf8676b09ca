"""What every fused operator shares: the symmetric buffer, the side lane, the epoch, the GEMM plan,
deadlines and the failure record (see the package's docstring for the protocol)."""

from __future__ import annotations

import functools
import threading
import time

import torch

from interlace.engine.comm import Group, SymmetricBuffer, signals
from interlace.engine.comm.group import ring
from interlace.engine.device import drain, drain_within, happened, new_stream
from interlace.kernels.flags import ABORTED, FLAG_WAIT_FAILED
from interlace.ops import flags as epoch_flags
from interlace.ops.flags import EpochValue
from interlace.ops.gemm import GEMM_WAIT_FAILED, Plan, cannot_launch_on, gemm, leave_sms, patience, plan_for

from ..lane import SideLane
from ..watchdog import WATCHDOG, log


def cannot_launch_for(group: Group) -> str | None:
    """Why this process cannot launch the fused kernels on ``group``'s tensors, or None."""
    reason = cannot_launch_on(group.device)
    return None if reason is None else f"the group's tensors are on {group.device}: {reason}"


@functools.lru_cache(maxsize=None)
def _warm_reader(device: torch.device) -> None:
    """A first flag read on ``device`` makes the reader's pinned slot and stream (one per device and
    process): now, not while a late call blocks streams."""
    signals.read(torch.zeros(1, dtype=torch.int32, device=device), 0)


class FusedOp:
    """Shared machinery: the symmetric buffer (``nbytes`` None: none, only this rank's flags), the
    lane, the epoch, the GEMM plan. ``wait_timeout``: seconds a wait spinning on the GPU (a GEMM
    tile's, a graph-safe flag wait's) gives up after; None: half the group's timeout, so that it
    gives up before the call's deadline, and ``status`` names what it waited for."""

    unseen = "the GPU is slow"  # why a call can be late with every flag it awaits raised

    def __init__(self, group: Group, nbytes: int | None, flags: int, name: str, *, check: bool, wait_timeout: float | None,
                 graph_safe: bool):  # fmt: skip
        if reason := cannot_launch_for(group):  # before any collective: every rank refuses alike
            raise RuntimeError(f"rank {group.rank}: {name}: {reason}")
        self.group, self.rank, self.world = group, group.rank, group.world_size
        self.wait_timeout = wait_timeout if wait_timeout is not None else group.timeout / 2
        patience(self.wait_timeout)  # a bad one refused now, before any collective, not inside a call
        self.buffer = None if nbytes is None else SymmetricBuffer.allocate(group, nbytes, flags)
        self.own_flags = torch.zeros(flags, dtype=torch.int32, device=group.device) if nbytes is None else None
        self.epoch, self.check_calls, self.name, self.graph_safe = 0, check, name, graph_safe
        self.late: str | None = None  # a call found past its deadline, blocked: recorded for good
        self._late_lock = threading.Lock()  # the watchdog's thread records too
        self.epoch_now = torch.zeros(1, dtype=torch.int32, device=group.device)
        self.status = torch.zeros(4, dtype=torch.int32, device=group.device)  # a wait that gave up: see check()
        self.lane = SideLane(group.device, group.timeout, f"{name} r{group.rank}", self.status, self.wait_timeout, _lane_stream(group),
                             group.peer_failed)  # fmt: skip
        self._plans: dict[tuple, Plan] = {}
        self._last_call: tuple[list[tuple[int, int, int]], int] = ([], 0)  # (what it awaited, its epoch)
        if group.device.type == "cuda":
            epoch_flags.warm_up(group.device)
            # zeroed on this stream: a first call on another must not overtake the fills
            drain_within(group.device, group.timeout, f"rank {self.rank}: {name}: zeroing its flags")
            _warm_reader(group.device)

    def close(self) -> None:
        """Collective when the operator has a symmetric buffer. On a GPU the caller's stream first
        waits for the lane: memory of this operator's that the lane may still write (flags, status,
        staging) is then reused on that stream only after it, even after a check=False call."""
        if self.lane.stream is not None:
            self.lane.join()
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

    def _expect(self, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        """Checked before a call starts: a call rejected after its epoch advanced would leave the
        operator's ranks out of step for good."""
        dev, dtype = self.group.device, str(self.dtype).removeprefix("torch.")
        if tuple(t.shape) != shape or t.dtype != self.dtype or t.device.type != dev.type or dev.index not in (None, t.device.index):
            raise ValueError(f"rank {self.rank}: {what} must be {dtype}{list(shape)} on {dev}, "
                             f"got {str(t.dtype).removeprefix('torch.')}{list(t.shape)} on {t.device}")  # fmt: skip

    def _expect_matmul(self, x: torch.Tensor, weight: torch.Tensor, m: int, n: int) -> None:
        k = x.shape[1] if x.dim() == 2 else "K"
        self._expect(x, (m, k), f"{self.name} x")
        self._expect(weight, (n, k), f"{self.name} weight")

    def check(self) -> None:
        """Raise ``TimeoutError`` if a wait of this operator gave up, or a call was late. Waits for
        the caller's stream first (on a GPU), for at most the group's timeout: past it, raises what
        the last call waits for instead of blocking behind a stream wait never satisfied. A failure
        stays recorded: the operator's ranks no longer agree on epochs, so every later call fails too."""
        self._check_by(time.monotonic() + self.lane.timeout)

    def _check_by(self, deadline: float) -> None:
        self._raise_late()
        self._settle(deadline)
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

    def _begin(self, x: torch.Tensor | None = None, w: torch.Tensor | None = None, hooks: dict | None = None,
               **plan: int) -> tuple[bool, Plan | None]:  # fmt: skip
        """Start a call on the caller's stream: whether it is being captured in a CUDA graph, and
        the plan of the GEMM of ``x`` and ``w`` with ``gemm`` arguments ``hooks`` (made first:
        tuning and compiling count against no deadline)."""
        self._raise_late()
        capturing = self.group.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        self.graph_safe |= capturing
        chosen = self._plan(x, w, hooks or {}, capturing=capturing, **plan) if x is not None else None
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
        self._last_call = (awaited, self.epoch)
        if capturing:
            return
        gpu, epoch = self.group.device.type == "cuda", self.epoch
        if not self.check_calls:
            if gpu:
                event = torch.cuda.current_stream(self.group.device).record_event()
                done = functools.partial(happened, event, self.group.device)
                WATCHDOG.watch(self, done, self.lane.deadline, lambda: self._report_late(awaited, epoch, done))
            return
        self._check_by(self.lane.deadline)

    def _settle(self, deadline: float) -> None:
        """(GPU) Block until the caller's stream has done what it queued; past ``deadline`` (or once
        the watchdog has found the last call late), raise what that call waits for. Recorded for
        good when it may be blocked: the streams stay blocked behind it, so a later call (or
        check(), whose read would queue behind them) must raise at once, not wait. Not when every
        flag it awaits is raised: it is slow, and will finish. At once when a peer thread
        (LocalGroup) has failed and a flag this call awaits is behind: it never comes."""
        peer_failed, asked = self.lane.peer_failed, False

        def poll() -> None:
            nonlocal asked
            if self.late is None and not asked and (why := peer_failed()) is not None:
                asked = True  # the flags read once
                text, blocked = self._behind(*self._last_call)
                if blocked:
                    self._record_late(f"rank {self.rank}: {self.name} epoch {self._last_call[1]} gave up waiting: {why} "
                                      f"({text.partition('; ')[2]})")  # fmt: skip
            if self.late is None and time.monotonic() > deadline:
                text, blocked = self._behind(*self._last_call)
                if not blocked:  # every flag it awaits is raised: slow, not stuck, and the ranks still agree
                    raise TimeoutError(text + "; not recorded as a failure")
                self._record_late(text)
            if self.late is not None:
                raise TimeoutError(self.late)

        drain(self.group.device, poll)

    def _report_late(self, awaited: list[tuple[int, int, int]], epoch: int, done) -> bool:
        """(The watchdog's thread) log and record a late call, unless it has just finished; whether
        it did. The failure is recorded before the flags are read: a read could queue behind
        blocked work, or fail."""
        if self.late is not None:
            return True
        if done():
            return False
        by = " (a call made with check=False, reported by the watchdog)"
        first = self._late(epoch) + by
        if self._record_late(first) != first:  # check() recorded it first
            return True
        log.error(first + "; reading the flags it waits on")
        log.error(self._record_late(self._behind(awaited, epoch)[0] + by, over=first))
        return True

    def _record_late(self, text: str, over: str | None = None) -> str:
        """``late = text`` unless a failure is recorded already (other than ``over``, which this
        record replaces); what ``late`` then is."""
        with self._late_lock:
            if self.late is None or self.late == over:
                self.late = text
            return self.late

    def _raise_late(self) -> None:
        if self.late is not None:
            raise TimeoutError(self.late)

    def _behind(self, awaited: list[tuple[int, int, int]], epoch: int) -> tuple[str, bool]:
        """What call ``epoch`` (host-side; graph-safe operators read the device's) waits for, and
        whether it may be blocked (a flag it awaits is behind, or the flags cannot be read)."""
        try:
            epoch = signals.read(self.epoch_now, 0) if self.graph_safe else epoch
            seen = [(q, i, signals.read(self._flags(q), i), signals.wrap(epoch * s)) for q, i, s in awaited]  # one read each
        except TimeoutError as error:  # the reads queue behind the blocked work
            return f"{self._late(epoch)}; its flags cannot be read: {error}", True
        behind = [f"rank {q} flag {i} is {value}, needs {target}" for q, i, value, target in seen if signals.wrap(value - target) < 0]
        return f"{self._late(epoch)}; behind: {'; '.join(behind) or f'nothing this rank can see ({self.unseen})'}", bool(behind)

    def _late(self, epoch: int) -> str:
        return f"rank {self.rank}: {self.name} epoch {epoch} did not finish within {self.lane.timeout} s"

    def _plan(self, x: torch.Tensor, w: torch.Tensor, hooks: dict, *, capturing: bool, waits: bool = False, spare: int = 0) -> Plan:
        """The GEMM's plan. Rank threads sharing one GPU split its multiprocessors, so that every
        rank's persistent GEMM is resident at once (a waiting kernel must not starve its producer).
        It leaves an SM per lane on the GPU for the lanes' kernels: graph-safe flag kernels (which a
        waiting GEMM needs, and which overlap the GEMM only if resident beside it), and, for a GEMM
        that ``waits``, the copies it waits for, which the driver may run on SMs when same-device;
        and ``spare`` more (a collective's kernels).
        On a GPU the first for a shape (eager: it may tune) compiles the GEMM with ``hooks`` and
        ends in a barrier, so that no rank's kernels run while a peer times its own, and no rank's
        waits spin while a peer compiles what they wait for; never under capture (tuning cannot be
        captured)."""
        shape = (tuple(x.shape), tuple(w.shape), x.dtype)
        key = (*shape, waits, spare, self.graph_safe)
        if key not in self._plans:
            sharing = self.world if hasattr(self.group, "share") else 1
            lanes = sharing if self.graph_safe or waits else 0
            plan = leave_sms(plan_for(x, w), x.device, lanes + spare, sharing)
            if x.is_cuda and not capturing and not any(k[:3] == shape for k in self._plans):
                gemm(x, w, plan=plan, compile_only=True, **hooks)
                self.group.barrier()
            self._plans[key] = plan  # kept once compiled and met: a failure there is met again next call
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


def chunk_rows_for(m: int, chunks: int) -> int:
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


def check_counters(group: Group, name: str, chunk_rows: int, n: int) -> None:
    """A chunk's signal counter grows by ``chunk_rows * n`` per call, compared wrap-aware in int32."""
    if chunk_rows * n >= 2**31:
        raise ValueError(f"rank {group.rank}: {name}: a chunk of {chunk_rows} rows x {n} columns is more outputs than an "
                         "int32 signal counter counts per call: use more chunks")  # fmt: skip
