"""LocalGroup: N ranks as threads of one process, on the CPU or on one GPU with a stream per rank.

The fast test transport, and on one GPU the only honest place to measure overlap: all ranks
share one CUDA context, so their kernels really run concurrently. It models a collective's
semantics and concurrency, not a fabric's bandwidth.

How a call runs: the rank deposits its validated call in a *round* (one per collective step, or
per send/recv pair) and gets a :class:`Work` back at once. When the last participant arrives, the
round goes to the world's *engine*, one thread that checks the participants agree and computes
every participant's output (on a GPU: on one comm stream, after every input is ready, concurrent
with the ranks' own streams). All inputs are read before any output is written, so an in-place
all_reduce is safe, and a work completes only when its whole round is done, so inputs may be
reused after ``wait()``.

The engine only ever takes complete rounds, so it never blocks and no interleaving of sends,
receives and collectives can deadlock it (gloo semantics). It also needs ~2 thread hand-offs per
call where per-rank worker threads need ~4W: measured on 2 cores, mean time per 4 KiB all_reduce
at world size 1 and 4, a thread per call took 348 and 1672 us, per-rank workers 131 and 923 us,
this engine 85 and 321 us.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..device import drain_within, keep_alive, new_stream, record_event, shared_queues
from .calls import Call, check_agreement, check_pair, label
from .errors import CommTimeoutError, PeerFailedError, root_cause
from .group import Group, ThreadWork, Work
from .reduce import reduce_into, rows


class _LocalWork(ThreadWork):
    grace = 0.0  # the engine never blocks: a missed deadline means peers never arrived

    def __init__(self, what: str, call: Call, deadline: float, group: LocalGroup, rnd: _Round):
        super().__init__(group, call, what, deadline)
        self._round = rnd

    def missing(self) -> list[int]:
        return self.group._hub.missing(self._round)

    def wait(self) -> torch.Tensor | None:
        if not self._done.wait(max(0.0, self.deadline - time.monotonic())):
            missing = self.missing()
            phase = "waiting for them to arrive" if missing else "every rank arrived; the engine did not finish"
            raise CommTimeoutError(self.what, self.group.rank, self.group.timeout, missing, phase)
        return super().wait()


class _Round:
    """Meeting point of one collective step (all ranks) or one send/recv pair (two ranks)."""

    __slots__ = ("participants", "calls", "works", "ready")

    def __init__(self, participants: tuple[int, ...]):
        self.participants = participants
        self.calls: dict[int, Call] = {}
        self.works: dict[int, _LocalWork] = {}
        self.ready: dict[int, Any] = {}  # rank -> event after its input was produced (GPU) or None


class _Hub:
    """State shared by the ranks of one LocalGroup world, and its engine thread."""

    def __init__(self, world_size: int, device: torch.device, timeout: float):
        self.world_size, self.device, self.timeout = world_size, device, timeout
        self.lock = threading.Lock()
        self.rounds: dict[tuple, _Round] = {}  # rounds still waiting for participants
        self.gone: dict[int, str] = {}  # rank -> why it will never join another round
        self.failed: dict[int, str] = {}  # those of them that raised
        self.stream = new_stream(device) if device.type == "cuda" else None
        self.complete: queue.SimpleQueue[_Round | None] = queue.SimpleQueue()
        self.shared: dict[tuple, dict[int, Any]] = {}
        self.shared_cond = threading.Condition(self.lock)
        threading.Thread(target=self._engine, daemon=True, name="interlace local engine").start()

    def join(self, key: tuple, rnd_participants: tuple[int, ...], rank: int, call: Call, work_for) -> _LocalWork:
        """Deposit a call; hand the round to the engine when it is complete."""
        with self.lock:
            rnd = self.rounds.get(key) or self.rounds.setdefault(key, _Round(rnd_participants))
            work = work_for(rnd)
            rnd.calls[rank], rnd.works[rank], rnd.ready[rank] = call, work, record_event(self.device)
            if len(rnd.calls) == len(rnd.participants):
                del self.rounds[key]
                self.complete.put(rnd)
            elif gone := [p for p in self._missing(rnd) if p in self.gone]:
                del self.rounds[key]
                self._fail_waiting(rnd, gone)
            return work

    def missing(self, rnd: _Round) -> list[int]:
        with self.lock:
            return self._missing(rnd)

    def exchange(self, key: tuple, rank: int, obj: Any, deadline: float, what: str) -> list[Any]:
        """Every rank's ``obj`` for ``key``, in rank order, once all have arrived."""
        with self.shared_cond:
            slot = self.shared.setdefault(key, {})
            slot[rank] = obj
            self.shared_cond.notify_all()
            while missing := [r for r in range(self.world_size) if r not in slot]:
                if gone := [r for r in missing if r in self.gone]:
                    raise PeerFailedError(f"{what} on rank {rank}: waited for ranks {missing}, but rank {gone[0]} {self.gone[gone[0]]}")
                if (remaining := deadline - time.monotonic()) <= 0:
                    raise CommTimeoutError(what, rank, self.timeout, missing, "waiting for them to arrive")
                self.shared_cond.wait(remaining)
            objs = [slot[r] for r in range(self.world_size)]
            slot.setdefault(-1, set()).add(rank)  # who has taken the result: the last one cleans up
            if len(slot[-1]) == self.world_size:
                del self.shared[key]
            return objs

    def mark_gone(self, rank: int, why: str, failed: bool = False) -> None:
        """Record that ``rank`` will never join again (``failed``: it raised); fail every round
        still waiting for it."""
        with self.lock:
            self.shared_cond.notify_all()
            self.gone[rank] = why
            if failed:
                self.failed[rank] = why
            for key, rnd in list(self.rounds.items()):
                if rank in self._missing(rnd):
                    del self.rounds[key]
                    self._fail_waiting(rnd, [rank])

    def close(self) -> None:
        self.complete.put(None)

    def _missing(self, rnd: _Round) -> list[int]:
        return [p for p in rnd.participants if p not in rnd.calls]

    def _fail_waiting(self, rnd: _Round, gone: list[int]) -> None:
        why = "; ".join(f"rank {p} {self.gone[p]}" for p in gone)
        for rank, work in rnd.works.items():
            work.fail(PeerFailedError(f"{work.what} on rank {rank}: waited for ranks {self._missing(rnd)}, but {why}"))

    def _engine(self) -> None:
        while (rnd := self.complete.get()) is not None:
            try:
                _check(rnd)
                event = _complete(rnd, self.world_size, self.stream)
            except BaseException as error:  # reported to every participant's wait()
                for work in rnd.works.values():
                    work.fail(error)
            else:
                for work in rnd.works.values():
                    work.finish(event)


class LocalGroup(Group):
    """Rank ``rank`` of a world of threads; create worlds with :func:`run_threads` (or ``spawn``)."""

    def __init__(self, hub: _Hub, rank: int):
        self._hub, self.rank = hub, rank
        self.world_size, self.device, self.timeout = hub.world_size, hub.device, hub.timeout
        self._seq = 0
        self._pairs: Counter[tuple[int, int]] = Counter()
        self._thread = threading.current_thread()  # the rank's own (see _from_own_thread)

    def _start(self, call: Call) -> Work:
        self._from_own_thread(call)
        key, what, participants = self._route(call)
        deadline = time.monotonic() + self.timeout
        return self._hub.join(key, participants, self.rank, call, lambda rnd: _LocalWork(what, call, deadline, self, rnd))

    def _from_own_thread(self, call: Call) -> None:
        """On one GPU, autograd runs every rank's CUDA backward on one device thread: a collective
        there would wait, until its deadline, for the peers' calls queued behind it. Refused at once."""
        here = threading.current_thread()
        if self.device.type == "cuda" and self.world_size > 1 and here is not self._thread:
            raise RuntimeError(f"rank {self.rank}: {call.kind} called on thread {here.name!r}, not on the rank's own "
                               f"({self._thread.name!r}): on one GPU, LocalGroup cannot run backward (autograd runs every "
                               "rank's backward on one device thread, where ranks would wait for each other). Run "
                               "backward with a rank per process: spawn(fn, world_size, 'symmetric' or 'nccl', device='cuda')")  # fmt: skip

    def peer_failed(self) -> str | None:
        """Which peer raised, and what, if one did: flags it was to raise on a GPU never come, so
        a rank waiting on them can give up at once instead of at its deadline."""
        if not self._hub.failed:  # entries are only added: no lock for the usual answer (polled often)
            return None
        with self._hub.lock:
            return next((f"rank {r} {why}" for r, why in self._hub.failed.items() if r != self.rank), None)

    def memory_not_shared(self) -> None:
        return None  # one process

    def share(self, obj: Any) -> list[Any]:
        """Collective, in-process: every rank's ``obj`` (the same Python objects), in rank order.
        Ranks of one LocalGroup share an address space: this is how they share memory."""
        self._seq += 1
        what = f"share #{self._seq}"
        return self._hub.exchange(("share", self._seq), self.rank, obj, time.monotonic() + self.timeout, what)

    def _route(self, call: Call) -> tuple[tuple, str, tuple[int, ...]]:
        """The round key, a label for messages, and the participating ranks."""
        if call.kind in ("send", "recv"):
            pair = (self.rank, call.peer) if call.kind == "send" else (call.peer, self.rank)
            self._pairs[pair] += 1
            return ("p2p", *pair, self._pairs[pair]), label(call, self._pairs[pair]), pair
        self._seq += 1
        return ("collective", self._seq), label(call, self._seq), tuple(range(self.world_size))


def _check(rnd: _Round) -> None:
    first = rnd.participants[0]
    if rnd.calls[first].kind == "send":
        src, dst = rnd.participants
        check_pair(rnd.works[dst].what, src, rnd.calls[src].signature(), dst, rnd.calls[dst].signature())
    else:
        check_agreement(rnd.works[first].what, [rnd.calls[p].signature() for p in rnd.participants])


def _complete(rnd: _Round, world: int, stream: Any) -> Any:
    """Compute every participant's output; every input is read before any output is written."""
    with _on(stream):
        _wait_events(stream, rnd.ready.values())
        calls = [rnd.calls[p] for p in rnd.participants]
        keep_alive(stream, [t for c in calls for t in (c.x, c.out)])
        kind = calls[0].kind
        if kind == "send":
            calls[1].out.copy_(calls[0].x)
        elif kind == "all_gather":
            gathered = torch.cat([c.x for c in calls])
            for c in calls:
                c.out.copy_(gathered)
        elif kind == "all_to_all":
            blocks = torch.stack([c.x.reshape(world, -1) for c in calls])  # [from q, to r, n]
            for r, c in enumerate(calls):
                c.out.view(world, -1).copy_(blocks[:, r])
        elif kind in ("all_reduce", "reduce_scatter"):
            x = calls[0].x
            total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            reduce_into([c.x for c in calls], calls[0].op, total)
            for r, c in enumerate(calls):
                c.out.copy_(total if kind == "all_reduce" else rows(total, r, world))
        return record_event(stream.device, stream) if stream is not None else None


@contextlib.contextmanager
def _on(stream: Any) -> Iterator[None]:
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield


def _wait_events(stream: Any, events: Any) -> None:
    if stream is not None:
        for event in events:
            if event is not None:
                stream.wait_event(event)


def run_threads(
    fn: Callable[..., Any],
    world_size: int,
    *,
    device: str | torch.device = "cpu",
    timeout: float,
    deadline: float | None = None,
    args: tuple = (),
) -> list[Any]:
    """Run ``fn(group, *args)`` on ``world_size`` rank threads; return the results in rank order.

    On a GPU each rank thread runs on a stream of its own. If a rank raises, waiting peers fail
    at once (:class:`PeerFailedError`) and the first root-cause exception is re-raised here.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    streams = 2 * world_size + 1  # a compute stream and a lane per rank, the hub's
    if device.type == "cuda" and world_size > 1 and (why := shared_queues(streams)):
        warnings.warn(f"LocalGroup with {world_size} ranks: {why}", RuntimeWarning, stacklevel=3)  # spawn()'s caller
    hub = _Hub(world_size, device, timeout)
    results: list[Any] = [None] * world_size
    failures: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def rank_main(rank: int) -> None:
        try:
            with _rank_stream(hub.device, rank, timeout):
                results[rank] = fn(LocalGroup(hub, rank), *args)
        except BaseException as error:
            with lock:
                failures.append((rank, error))
            hub.mark_gone(rank, f"failed with {type(error).__name__}: {error}", failed=True)
        else:
            hub.mark_gone(rank, "returned from its function")

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True, name=f"interlace rank {r}") for r in range(world_size)]
    for t in threads:
        t.start()
    end = None if deadline is None else time.monotonic() + deadline
    for t in threads:
        t.join(None if end is None else max(0.0, end - time.monotonic()))
    hub.close()
    if failures:
        raise root_cause(failures)
    if alive := [r for r, t in enumerate(threads) if t.is_alive()]:
        raise TimeoutError(f"ranks {alive} of {world_size} still running after the {deadline} s deadline")
    return results


FAILED_DRAIN_S = 1.0  # seconds a failed rank's stream is given to finish


@contextlib.contextmanager
def _rank_stream(device: torch.device, rank: int, timeout: float) -> Iterator[None]:
    """On a GPU: the rank's own stream, drained when the rank's function ends, for at most
    ``timeout`` seconds (a stream wait on a peer that never comes has no deadline of its own)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_device(device)
    with torch.cuda.stream(new_stream(device)):
        try:
            yield
        except BaseException:
            # briefly: a stream blocked on a peer that failed never finishes, and waiting out the
            # timeout would only hold back the error, which stays the error
            with contextlib.suppress(TimeoutError):
                drain_within(device, min(timeout, FAILED_DRAIN_S), f"rank {rank}")
            raise
        drain_within(device, timeout, f"rank {rank}: its GPU stream, after its function returned (work queued behind a "
                     "stream wait on a peer that never raised its flag?)")  # fmt: skip
