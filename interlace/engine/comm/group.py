"""The one communication interface every transport implements.

A ``Group`` is one rank's view of a set of ranks. Every method is collective over the group
(every rank must call it, in the same order) except ``send``/``recv``, which pair two ranks.
Each call has an ``*_async`` form returning a :class:`Work` that is in flight while the caller
works; the plain form is the async form followed by ``wait()``.

Deadlines: every call must complete within ``group.timeout`` seconds of being started, or its
``wait()`` raises :class:`CommTimeoutError` naming the call, the rank and the peers not heard from.
Arguments are validated before anything is sent (``ValueError``/``TypeError`` naming the rank and
the tensor); ranks that disagree raise :class:`CollectiveMismatchError` naming every rank's call.
See ``calls.py`` for the shape table.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from interlace.engine.device import await_event

from .calls import Call, make_call
from .errors import CommTimeoutError


class Work(ABC):
    """An operation in flight. ``wait()`` returns the output tensor (``None`` for send/barrier)."""

    @abstractmethod
    def wait(self) -> torch.Tensor | None:
        """Block until done (on a GPU: until the caller's current stream is ordered after it)."""

    @abstractmethod
    def is_completed(self) -> bool:
        """True once the operation has finished; never blocks."""


class Group(ABC):
    """One rank's handle on a group of ``world_size`` ranks; see the module docstring."""

    rank: int
    world_size: int
    device: torch.device
    timeout: float
    hosts: int = 1  # the machines the ranks run on (DistGroup counts them; the other transports run on one)

    def peer_failed(self) -> str | None:
        """Which peer failed, and how, where the transport learns of it before any deadline
        (LocalGroup: a rank thread that raised); else None."""
        return None

    def memory_not_shared(self) -> str | None:
        """Why this group's ranks may not share memory (fused AG+GEMM, GEMM+RS and two-shot GEMM+AR
        need it), or None where they do. The same answer on every rank."""
        return f"a {type(self).__name__} does not say whether its ranks share memory"

    def all_gather(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate every rank's ``x`` [n, ...] along dim 0 in rank order: [W*n, ...]."""
        return self.all_gather_async(x, out=out).wait()

    def reduce_scatter(self, x: torch.Tensor, op: str = "sum", *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reduce ``x`` [W*n, ...] over ranks; this rank keeps rows rank*n:(rank+1)*n: [n, ...]."""
        return self.reduce_scatter_async(x, op, out=out).wait()

    def all_reduce(self, x: torch.Tensor, op: str = "sum", *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reduce ``x`` over ranks (``op`` in sum, avg, max). ``out=x`` reduces in place."""
        return self.all_reduce_async(x, op, out=out).wait()

    def all_to_all(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Slice q of ``x`` [W*n, ...] goes to rank q; slice q of the result came from rank q."""
        return self.all_to_all_async(x, out=out).wait()

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send ``x`` to rank ``dst``; returns once ``x`` may be reused (not necessarily received)."""
        self.send_async(x, dst).wait()

    def recv(self, out: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``out`` from rank ``src``; shape and dtype must match the send."""
        return self.recv_async(out, src).wait()

    def sendrecv(self, x: torch.Tensor, dst: int, out: torch.Tensor, src: int) -> torch.Tensor:
        """Send ``x`` to ``dst`` and receive into ``out`` from ``src`` at once: one step of a ring."""
        return self.sendrecv_async(x, dst, out, src).wait()

    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""
        self.barrier_async().wait()

    def all_gather_async(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> Work:
        return self._start(self._call("all_gather", x=x, out=out))

    def reduce_scatter_async(self, x: torch.Tensor, op: str = "sum", *, out: torch.Tensor | None = None) -> Work:
        return self._start(self._call("reduce_scatter", x=x, out=out, op=op))

    def all_reduce_async(self, x: torch.Tensor, op: str = "sum", *, out: torch.Tensor | None = None) -> Work:
        return self._start(self._call("all_reduce", x=x, out=out, op=op))

    def all_to_all_async(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> Work:
        return self._start(self._call("all_to_all", x=x, out=out))

    def send_async(self, x: torch.Tensor, dst: int) -> Work:
        return self._start(self._call("send", x=x, peer=dst))

    def recv_async(self, out: torch.Tensor, src: int) -> Work:
        return self._start(self._call("recv", out=out, peer=src))

    def sendrecv_async(self, x: torch.Tensor, dst: int, out: torch.Tensor, src: int) -> Work:
        """Both halves are posted before either is waited on (transports that need it group them)."""
        return _Both(self.send_async(x, dst), self.recv_async(out, src))

    def barrier_async(self) -> Work:
        return self._start(self._call("barrier"))

    def close(self) -> None:
        """Release transport resources (collective where the transport says so)."""

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def _call(self, kind: str, **kwargs) -> Call:
        return make_call(kind, self.rank, self.world_size, self.device, **kwargs)

    @abstractmethod
    def _start(self, call: Call) -> Work:
        """Begin a validated call and return its handle."""


class _Both(Work):
    """A send and a receive posted together; ``wait()`` returns the received tensor."""

    def __init__(self, send: Work, recv: Work):
        self._send, self._recv = send, recv

    def wait(self) -> torch.Tensor:
        out = self._recv.wait()
        self._send.wait()
        return out

    def is_completed(self) -> bool:
        return self._send.is_completed() and self._recv.is_completed()


def ring(rank: int, world_size: int) -> list[int]:
    """The other ranks in ring order starting after ``rank`` (spreads reads across peers)."""
    return [(rank + i) % world_size for i in range(1, world_size)]


class ThreadWork(Work):
    """Work completed by another thread (a transport's engine or lane): it calls ``finish(event)``
    (a CUDA event, or None on CPU) or ``fail(error)``. ``wait()`` raises the error, or orders the
    caller's stream after the event; past the call's deadline it raises ``CommTimeoutError``
    naming the peers ``missing()`` reports."""

    grace = 1.0  # seconds the thread gets beyond the deadline to report its own, more precise, timeout
    host_waits_for_gpu = False  # also block the host until the event completes (transports with no GPU deadline)

    def __init__(self, group: Group, call: Call, what: str, deadline: float):
        self.group, self.call, self.what, self.deadline = group, call, what, deadline
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._event: Any = None

    def finish(self, event: Any) -> None:
        self._event = event
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def missing(self) -> list[int] | None:
        """Peers not heard from, when the transport can tell."""
        return None

    def wait(self) -> torch.Tensor | None:
        g = self.group
        if not self._done.wait(max(0.0, self.deadline - time.monotonic()) + self.grace):
            raise CommTimeoutError(self.what, g.rank, g.timeout, self.missing(), "its communication thread never reported")
        if self._error is not None:
            raise self._error
        if self._event is not None:
            def poll() -> None:
                if time.monotonic() > self.deadline:
                    raise CommTimeoutError(self.what, g.rank, g.timeout, self.missing(), "the GPU work did not finish")

            if self.host_waits_for_gpu:
                await_event(self._event, poll)
            torch.cuda.current_stream(g.device).wait_event(self._event)
        return self.call.out

    def is_completed(self) -> bool:
        return self._done.is_set() and (self._event is None or self._event.query())
