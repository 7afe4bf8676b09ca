"""SymmetricGroup: the communication interface over symmetric buffers, for the processes of one node.

Each rank's buffer holds a collective area and one outbox per peer (``capacity`` bytes each); its
signal pad holds:

- ``READY``: the epoch of the latest collective whose input this rank has published;
- ``DONE``: the epoch of the latest collective this rank has finished reading;
- ``SENT + d``: messages this rank has put in its outbox for rank d;
- ``TAKEN + s``: messages this rank has taken from rank s's outbox;
- on CPU, signature words: the call each rank made, so that disagreements are named.

Collective e on rank r: wait until every peer's DONE >= e-1 (done reading r's area), copy the
input in, publish READY = e, then for each peer wait for READY >= e, read, and finally publish
DONE = e. All-reduce is one-shot: every rank reads every peer's input and reduces in rank order
(identical bits everywhere, one pass; the right choice for small messages). Send n to d: wait
for d's TAKEN[r] >= n-1, copy into outbox[d], SENT[d] = n. Receive n from s: wait for s's
SENT[r] >= n, copy out, TAKEN[s] = n.

Calls run on *lanes*, worker threads that keep issue order: one per rank for collectives, one
per (peer, direction) for point-to-point, so a receive posted early never blocks a collective. On
a CPU a lane does the work itself, waiting with the group's deadline. On a GPU it enqueues stream
waits, stream writes and copies on its own stream, and ``wait()`` blocks the host until the work
is done or the deadline passes, naming the peers whose READY flag is behind. Signature checks are
CPU-only (reading device flags would synchronise every call).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from typing import Any

import torch

from . import signals
from .calls import SIGNATURE_LEN, Call, check_agreement, check_pair, label
from .errors import CommTimeoutError
from ..device import keep_alive, new_stream, record_event
from .group import Group, ThreadWork, Work, ring
from .reduce import reduce_into, rows
from .symmetric import SymmetricBuffer

READY, DONE, SENT = 0, 1, 2
DEFAULT_CAPACITY = 16 << 20


class SymmetricGroup(Group):
    """One rank of a symmetric-buffer group built on ``bootstrap`` (construction is collective).

    ``capacity`` bounds the bytes of one rank's input to a collective and of one message; every
    rank maps ``(1 + W) * capacity`` bytes per peer.
    """

    def __init__(self, bootstrap: Group, *, capacity: int = DEFAULT_CAPACITY, timeout: float | None = None):
        self.rank, self.world_size, self.device = bootstrap.rank, bootstrap.world_size, bootstrap.device
        self.timeout, self.capacity = timeout if timeout is not None else bootstrap.timeout, capacity
        w = self.world_size
        self._taken, self._sig = SENT + w, SENT + 2 * w
        self._checks = self.device.type != "cuda"
        flags = self._sig + (1 + w) * SIGNATURE_LEN if self._checks else self._sig
        self.buffer = SymmetricBuffer.allocate(bootstrap, (1 + w) * capacity, flags)
        self._seq, self._pairs = 0, Counter()
        self._lanes: dict[tuple, tuple[queue.SimpleQueue, threading.Thread]] = {}
        self._lock = threading.Lock()

    def memory_not_shared(self) -> None:
        return None  # its buffers are mapped by every rank

    def close(self) -> None:
        """Collective: drain the lanes (their queued calls finish), then release the buffers."""
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for tasks, thread in lanes:
            tasks.put(None)
            thread.join(self.timeout)
        self.buffer.close()

    # --- issuing --------------------------------------------------------------------------------

    def _start(self, call: Call) -> Work:
        payload = call.payload
        if payload is not None and payload.nbytes > self.capacity:
            raise ValueError(f"rank {self.rank}: {call.kind} of {payload.nbytes} bytes exceeds the symmetric capacity "
                             f"of {self.capacity} bytes; build SymmetricGroup(capacity=...) larger")  # fmt: skip
        if call.kind in ("send", "recv"):
            self._pairs[(call.kind, call.peer)] += 1
            n, lane = self._pairs[(call.kind, call.peer)], (call.kind, call.peer)
        else:
            self._seq += 1
            n, lane = self._seq, ("collective",)
        work = _SymmetricWork(self, call, label(call, n), time.monotonic() + self.timeout, n)
        ready = record_event(self.device)
        self._lane(lane).put(lambda: self._run(call, n, work, ready))
        return work

    def _lane(self, key: tuple) -> queue.SimpleQueue:
        with self._lock:
            if key not in self._lanes:
                tasks = queue.SimpleQueue()
                stream = new_stream(self.device) if self.device.type == "cuda" else None
                thread = threading.Thread(target=_run_lane, args=(tasks, stream), daemon=True, name=f"interlace symmetric r{self.rank} {key}")
                thread.start()
                self._lanes[key] = (tasks, thread)
            return self._lanes[key][0]

    def _run(self, call: Call, n: int, work: _SymmetricWork, ready: Any) -> None:
        try:
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
                keep_alive(torch.cuda.current_stream(self.device), [call.x, call.out])  # a caller may drop them before wait()
            {"send": self._send, "recv": self._recv}.get(call.kind, self._collective)(call, n, work)
            work.finish(record_event(self.device))
        except BaseException as error:  # reported by the caller's wait()
            work.fail(error)

    # --- the protocols --------------------------------------------------------------------------

    def _collective(self, call: Call, e: int, work: _SymmetricWork) -> None:
        buf, r, peers = self.buffer, self.rank, ring(self.rank, self.world_size)
        self._await_all(peers, DONE, e - 1, work, "finish reading the previous collective")
        if call.x is not None:
            buf.peer(r, call.x.dtype, tuple(call.x.shape)).copy_(call.x)
        self._publish_signature(self._sig, call)
        signals.write(buf.flags(r), READY, e, self._stream())
        self._await_all(peers, READY, e, work, "publish their input")
        if self._checks:
            check_agreement(work.what, [self._signature(q, self._sig) for q in range(self.world_size)])
        self._combine(call)
        signals.write(buf.flags(r), DONE, e, self._stream())

    def _combine(self, call: Call) -> None:
        """This rank's output from every rank's published input, read in place."""
        if call.x is None:
            return
        w, r = self.world_size, self.rank
        inputs = [self.buffer.peer(q, call.x.dtype, tuple(call.x.shape)) for q in range(w)]
        if call.kind == "all_gather":
            for q, x_q in enumerate(inputs):
                rows(call.out, q, w).copy_(x_q)
        elif call.kind == "all_to_all":
            for q, x_q in enumerate(inputs):
                rows(call.out, q, w).copy_(rows(x_q, r, w))
        elif call.kind == "all_reduce":
            reduce_into(inputs, call.op, call.out)
        else:
            reduce_into([rows(x_q, r, w) for x_q in inputs], call.op, call.out)

    def _send(self, call: Call, n: int, work: _SymmetricWork) -> None:
        d, buf = call.peer, self.buffer
        self._await_all([d], self._taken + self.rank, n - 1, work, "take the previous message")
        offset = (1 + d) * self.capacity
        buf.peer(self.rank, call.x.dtype, tuple(call.x.shape), offset).copy_(call.x)
        self._publish_signature(self._sig + (1 + d) * SIGNATURE_LEN, call)
        signals.write(buf.flags(self.rank), SENT + d, n, self._stream())

    def _recv(self, call: Call, n: int, work: _SymmetricWork) -> None:
        s, buf = call.peer, self.buffer
        self._await_all([s], SENT + self.rank, n, work, "send")
        if self._checks:
            check_pair(work.what, s, self._signature(s, self._sig + (1 + self.rank) * SIGNATURE_LEN), self.rank, call.signature())
        call.out.copy_(buf.peer(s, call.out.dtype, tuple(call.out.shape), (1 + self.rank) * self.capacity))
        signals.write(buf.flags(self.rank), self._taken + s, n, self._stream())

    # --- helpers --------------------------------------------------------------------------------

    def _await_all(self, peers: list[int], index: int, value: int, work: _SymmetricWork, to: str) -> None:
        if value <= 0:
            return
        for q in peers:
            if self.device.type == "cuda":
                signals.wait(self.buffer.flags(q), index, value, self._stream())
                continue
            try:
                signals.host_wait(self.buffer.flags(q), index, value, max(work.deadline - time.monotonic(), 0.0))
            except signals.FlagTimeoutError:
                behind = [p for p in peers if signals.read(self.buffer.flags(p), index) < value]
                raise CommTimeoutError(work.what, self.rank, self.timeout, behind, f"waiting for them to {to}") from None

    def _publish_signature(self, at: int, call: Call) -> None:
        if self._checks:
            self.buffer.flags(self.rank)[at : at + SIGNATURE_LEN] = torch.tensor(call.signature(), dtype=torch.int32)

    def _signature(self, rank: int, at: int) -> tuple[int, ...]:
        return tuple(self.buffer.flags(rank)[at : at + SIGNATURE_LEN].tolist())

    def _stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None


class _SymmetricWork(ThreadWork):
    def __init__(self, group: SymmetricGroup, call: Call, what: str, deadline: float, n: int):
        super().__init__(group, call, what, deadline)
        self.n = n
        self.host_waits_for_gpu = group.device.type == "cuda"  # stream waits have no deadline of their own

    def missing(self) -> list[int]:
        """Peers whose READY flag has not reached this call's epoch (the peer, for send/recv)."""
        g, call = self.group, self.call
        if call.kind in ("send", "recv"):
            return [call.peer]
        return [q for q in range(g.world_size) if q != g.rank and signals.wrap(signals.read(g.buffer.flags(q), READY) - self.n) < 0]


def _run_lane(tasks: queue.SimpleQueue, stream: torch.cuda.Stream | None) -> None:
    if stream is not None:
        torch.cuda.set_device(stream.device)
        torch.cuda.set_stream(stream)
    while (task := tasks.get()) is not None:
        task()
