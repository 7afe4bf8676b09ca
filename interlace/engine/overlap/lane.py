"""Where a fused operator's communication half runs, beside its GEMM.

On a GPU a ``SideLane`` is a CUDA stream: work is enqueued (stream waits on flags, copy-engine
chunks, small reductions) and ``join()`` orders the caller's stream after it. On a CPU it is a
thread that does the work while the caller runs the GEMM (under the Triton interpreter a kernel
sees flags a host thread raises); ``join()`` waits for it with a deadline and re-raises its
error. Operators write one program against ``wait_flag``, ``copy``, ``move``, ``run``, ``publish``,
``alongside`` and ``after_main``.

Flag values are ints (stream memory operations on a GPU: no kernel, value fixed when enqueued) or
``EpochValue``s (one-thread kernels reading the epoch when they run: what a CUDA graph replays). A
GPU epoch wait that gives up records ``[2, wait id, value, observed]`` in ``status``;
``wait_name(id)`` says what it waited for. A CPU lane resolves epoch values when it gets to them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from interlace.engine.comm import signals
from interlace.engine.device import new_stream
from interlace.kernels.flags import ABORTED
from interlace.ops import flags as epoch_flags
from interlace.ops.flags import EpochValue


class SideLane:
    grace = 1.0  # seconds join() allows beyond the deadline for the lane to report its own timeout
    peer_poll = 0.2  # seconds between a CPU wait's questions whether a peer failed

    def __init__(self, device: torch.device, timeout: float, name: str, status: torch.Tensor, wait_timeout: float,
                 stream: torch.cuda.Stream | None = None, peer_failed: Callable[[], str | None] = lambda: None):  # fmt: skip
        """``stream``: the CUDA stream to queue on (made if None; see ``new_stream``); ignored on CPUs.
        ``peer_failed``: which peer failed, and how, if one did (``LocalGroup.peer_failed``): a CPU
        wait then gives up at once, since the flag it waits for may never come."""
        self.device, self.timeout, self.status, self.wait_timeout = device, timeout, status, wait_timeout
        self.peer_failed = peer_failed
        self._wait_names: dict[str, int] = {}
        self.deadline = time.monotonic() + timeout
        self.stream = (stream if stream is not None else new_stream(device)) if device.type == "cuda" else None
        if self.stream is None:
            self._tasks: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._serve, daemon=True, name=f"interlace lane {name}").start()
        self._error: BaseException | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._pending, self._lock = 0, threading.Lock()
        self._main_done: threading.Event | None = None  # CPU: set by alongside() once main returned
        self._main_stream: torch.cuda.Stream | None = None  # GPU: the stream alongside()'s main queued on

    def start_call(self) -> None:
        """Every wait of one operator call shares one deadline, ``timeout`` from now."""
        self.deadline = time.monotonic() + self.timeout

    def after_current_stream(self) -> None:
        """Order the lane after what the caller's stream has queued (its inputs, its last GEMM)."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def run(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the lane: enqueue its kernels on the stream, or do it on the thread."""
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                fn()
            return
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._tasks.put(fn)

    def alongside(self, side: Callable[[], None], main: Callable[[], object]) -> object:
        """Run ``main`` on the caller and ``side`` on the lane, overlapped, when ``side`` waits for
        what ``main`` produces (``side`` may call ``after_main()``). On a GPU ``main``'s kernels are
        queued first (after an event taken before them, which the lane waits for): a stream wait
        queued ahead of the kernel it waits for can block it for good when the streams share a
        hardware queue. On a CPU the lane thread starts first, since ``main`` (an interpreted
        kernel) blocks the caller."""
        if self.stream is None:
            self._main_done = threading.Event()
            self.run(side)
            try:
                return main()
            finally:
                self._main_done.set()
        current = torch.cuda.current_stream(self.device)
        before = current.record_event()
        result = main()
        self._main_stream = current  # nothing is queued there until side() has run
        self.stream.wait_event(before)
        self.run(side)
        return result

    def after_main(self) -> None:
        """(On the lane, in ``alongside``'s ``side``) what follows waits for all of ``main``: for its
        kernels on a GPU (an event: no spinning kernel, and inside a CUDA graph an edge, where a
        flag wait on it would need the graph to run both branches at once), for its return on a
        CPU (within the deadline)."""
        if self.stream is not None:
            self.stream.wait_stream(self._main_stream)
        elif not self._main_done.wait(max(0.0, self.deadline - time.monotonic())):
            raise TimeoutError(f"a fused operator's GEMM did not finish within {self.timeout} s")

    def close(self) -> None:
        """Stop the lane's thread (CPU) once its queued work is done."""
        if self.stream is None:
            self._tasks.put(None)

    def wait_flag(self, flags: torch.Tensor, index: int, value: int | EpochValue, what: str) -> None:
        """(On the lane) until ``flags[index] >= value``; ``what`` names the wait in a timeout."""
        if self.stream is None:
            try:
                self._host_wait(flags, index, _now(value), what)
            except TimeoutError:
                # The caller's GEMM may spin on what this wait was to bring: ABORTED in status stops
                # it now, not after its own wait timeout (the first failure recorded wins).
                if int(self.status[0]) == 0:
                    signals.write(self.status, 0, ABORTED)
                raise
        elif isinstance(value, EpochValue):
            wait_id = self._wait_names.setdefault(f"{what}flag {index}", len(self._wait_names))
            epoch_flags.wait(flags, index, value, self.status, wait_id, self.wait_timeout, self.stream)
        else:
            signals.wait(flags, index, value, self.stream)

    def _host_wait(self, flags: torch.Tensor, index: int, value: int, what: str) -> None:
        """(CPU) Until the call's deadline, a slice at a time, giving up early once a peer failed."""
        while True:
            left = self.deadline - time.monotonic()
            try:
                signals.host_wait(flags, index, value, max(0.0, min(left, self.peer_poll)), what=what)
                return
            except signals.FlagTimeoutError as error:
                if left <= self.peer_poll:
                    raise signals.FlagTimeoutError(what, None, index, value, error.observed, self.timeout) from None
                if (why := self.peer_failed()) is not None:
                    raise TimeoutError(f"{what}flag {index} gave up waiting for {value} (observed {error.observed}): {why}") from None

    def wait_name(self, wait_id: int) -> str:
        return next((what for what, i in self._wait_names.items() if i == wait_id), f"unknown wait {wait_id}")

    def publish(self, flags: torch.Tensor, index: int, value: int | EpochValue) -> None:
        """(On the lane) ``flags[index] = value``, after everything before it on the lane."""
        if self.stream is not None and isinstance(value, EpochValue):
            epoch_flags.write(flags, index, value, self.status, self.stream)
        else:
            signals.write(flags, index, _now(value), self.stream)

    def copy(self, chunks: list[tuple[torch.Tensor, torch.Tensor]], flags: torch.Tensor, indices: list[int],
             value: int | EpochValue) -> None:  # fmt: skip
        """(On the lane) copy-engine chunks, each raising its flag."""
        if self.stream is None or not isinstance(value, EpochValue):
            signals.copy_chunks(chunks, flags, indices, _now(value), self.stream)
            return
        for chunk, index in zip(chunks, indices, strict=True):
            signals.copy_chunks([chunk], stream=self.stream)
            epoch_flags.write(flags, index, value, self.status, self.stream)

    def move(self, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """(On the lane) copy-engine chunks, raising no flag."""
        signals.copy_chunks(chunks, stream=self.stream)

    def join(self) -> None:
        """The caller's stream waits for the lane (GPU), or the caller waits (CPU, with a deadline)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            return
        if not self._idle.wait(max(0.0, self.deadline - time.monotonic()) + self.grace):
            raise TimeoutError(f"a fused operator's communication lane did not finish within {self.timeout} s")
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _serve(self) -> None:
        while (fn := self._tasks.get()) is not None:
            try:
                fn()
            except BaseException as error:  # re-raised by join() in the caller
                self._error = error
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()


def _now(value: int | EpochValue) -> int:
    return value.resolve() if isinstance(value, EpochValue) else value
