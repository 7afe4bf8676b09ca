"""Small device helpers shared by the engine and the benchmarks."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable

import torch


def synchronize(device: torch.device | torch.Tensor, timeout: float | None = None, what: str = "its queued work") -> None:
    """Wait for all queued work on a CUDA device (no-op on CPUs). With a ``timeout`` (seconds),
    ``TimeoutError`` past it: a stream parked in a wait on a peer that never comes would
    otherwise hold the caller forever."""
    if isinstance(device, torch.Tensor):
        device = device.device
    if device.type != "cuda":
        return
    if timeout is None:
        torch.cuda.synchronize(device)
    else:
        finish_within(lambda: torch.cuda.synchronize(device), timeout, f"synchronizing {device} ({what})")


def finish_within(fn, timeout: float, what: str):
    """``fn()``'s result, run on a helper thread; ``TimeoutError`` naming ``what`` when it has not
    returned after ``timeout`` seconds (the thread is left behind, a daemon)."""
    done, outcome = threading.Event(), {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name=f"interlace {what}").start()
    if not done.wait(timeout):
        raise TimeoutError(f"{what} did not finish within {timeout:g} s: a stream may be waiting on a peer that never came")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def await_event(event: torch.cuda.Event, poll: Callable[[], None]) -> None:
    """Block until ``event`` has happened, calling ``poll()`` between queries: it raises to give
    up. A synchronize would block for good behind a stream wait never satisfied."""
    while not event.query():
        poll()
        time.sleep(1e-4)


def drain(device: torch.device, poll: Callable[[], None]) -> None:
    """``await_event`` for the work queued so far on ``device``'s current stream (no-op on CPUs)."""
    if device.type == "cuda":
        await_event(torch.cuda.current_stream(device).record_event(), poll)


def drain_within(device: torch.device, seconds: float, what: str, error: type[TimeoutError] = TimeoutError) -> None:
    """``drain`` with a deadline ``seconds`` from now: past it, ``error`` naming ``what``."""
    deadline = time.monotonic() + seconds

    def poll() -> None:
        if time.monotonic() > deadline:
            raise error(f"{what}: the GPU work queued did not finish within {seconds:g} s (a stream wait is stuck)")

    drain(device, poll)


def happened(event: torch.cuda.Event, device: torch.device) -> bool:
    """Whether ``event`` has happened, asked with ``device`` current: from a thread with no current
    device (the watchdog's) the query would make a CUDA context on device 0."""
    with torch.cuda.device(device):
        return event.query()


def record_event(device: torch.device, stream: torch.cuda.Stream | None = None) -> torch.cuda.Event | None:
    """An event recorded on ``stream`` (default: the current one) of a CUDA device; None on CPUs."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(stream if stream is not None else torch.cuda.current_stream(device))
    return event


# Handles of streams whose wrappers were collected, per device, for new_stream to hand out again.
# They are never destroyed: torch keeps raw handles (record_stream, the caching allocator's
# per-stream pools) beyond the wrapper's life. RLock: a collection can run inside new_stream.
_FREE_STREAMS: dict[int, list[int]] = {}
_FREE_LOCK = threading.RLock()


def keep_alive(stream: torch.cuda.Stream | None, tensors: list[torch.Tensor | None]) -> None:
    """Tell the caching allocator ``tensors`` are in use on ``stream`` (work queued there reads or
    writes them): their memory is not handed out again before that work is done, even when the
    caller lets go of them first."""
    if stream is not None:
        for t in tensors:
            if t is not None and t.is_cuda:
                t.record_stream(stream)


def new_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream no live wrapper shares. ``torch.cuda.Stream()`` hands out pooled streams
    round-robin (32 per priority), so two of those can be one CUDA stream, and a stream wait queued
    on one would hold back the other's work: every stream that waits on a peer, or that a peer
    waits on, comes from here. A freed handle is handed out again only once idle: one still busy may
    be stuck behind a wait on a peer that never came, and is dropped."""
    from interlace.engine.comm.native import native

    index = device.index if device.index is not None else torch.cuda.current_device()
    with _FREE_LOCK:
        free, handle = _FREE_STREAMS.setdefault(index, []), None
        while free and handle is None:
            candidate = free.pop()
            handle = candidate if native().stream_idle(candidate) else None  # safe beside another thread's capture
        handle = handle or native().stream_create(index)
    stream = torch.cuda.ExternalStream(handle, device=torch.device("cuda", index))
    weakref.finalize(stream, _release, index, handle)
    return stream


def _release(index: int, handle: int) -> None:
    with _FREE_LOCK:
        _FREE_STREAMS[index].append(handle)


def shared_queues(streams: int, environ=os.environ) -> str | None:
    """Why ``streams`` concurrent streams of one process on one GPU may share hardware queues (CUDA
    gives a process CUDA_DEVICE_MAX_CONNECTIONS of them, 8 unless set, at most 32, read when CUDA
    starts), or None. Streams that share a queue run in one order: a stream wait on a peer holds
    back the other stream's work, which a peer may be waiting for."""
    raw = environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    try:
        queues = min(32, int(raw)) if raw is not None else 8
    except ValueError:
        return f"CUDA_DEVICE_MAX_CONNECTIONS={raw!r} is not an integer"
    if streams <= queues:
        return None
    setting = f"CUDA_DEVICE_MAX_CONNECTIONS={raw}" if raw is not None else "CUDA_DEVICE_MAX_CONNECTIONS is unset (8 queues)"
    fix = "set CUDA_DEVICE_MAX_CONNECTIONS=32 before CUDA starts" if streams <= 32 else "use fewer ranks per GPU"
    return f"{streams} streams on one GPU but {setting}: streams share hardware queues and a stream wait can stall a peer; {fix}"
