"""Late GPU work is named even when nothing on the host waits for it.

A fused call on a GPU with ``check=False`` returns once its work is queued, and its stream waits
have no deadline of their own: a peer that never raises a flag would leave the streams blocked
without a word, and the host would hang later in some unrelated synchronisation. The watchdog,
a daemon thread that runs while calls are pending, follows such calls by their completion (a CUDA
event). Calls under one key (an operator) finish in order, so it looks only at the oldest pending
one of each. When that one is still running past its deadline, it calls the call's ``late``; if
that reports it (returns True), the key's calls are forgotten: the later ones wait behind it.
If not (it finished meanwhile), the watchdog goes on with the next.

On a GPU the thread first makes its CUDA calls safe beside a CUDA-graph capture on another
thread (an event query from a thread in the default capture mode would invalidate the capture).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

POLL = 0.05  # seconds between looks; deadlines are seconds to minutes
log = logging.getLogger("interlace.overlap")


@dataclass(slots=True)
class _Call:
    done: Callable[[], bool]
    deadline: float
    late: Callable[[], bool]


class Watchdog:
    def __init__(self, poll: float = POLL, setup: Callable[[], None] | None = None):
        """``setup``: run first on each new thread of the watchdog."""
        self.poll, self.setup = poll, setup
        self._calls: dict[Hashable, collections.deque[_Call]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, key: Hashable, done: Callable[[], bool], deadline: float, late: Callable[[], bool]) -> None:
        """Call ``late()`` (on the watchdog's thread) if ``done()`` is still false at ``deadline``
        (``time.monotonic()``); it returns whether it reported the call. Forget the call once
        ``done()`` is true. ``key``'s calls finish in the order they are watched."""
        with self._lock:
            self._calls.setdefault(key, collections.deque()).append(_Call(done, deadline, late))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="interlace watchdog")
                self._thread.start()

    def pending(self) -> int:
        with self._lock:
            return sum(len(calls) for calls in self._calls.values())

    def _run(self) -> None:
        if self.setup is not None:
            _logged(self.setup, "setting up the watchdog's thread")
        while True:
            time.sleep(self.poll)
            with self._lock:
                keys = list(self._calls)
            for key in keys:
                call = self._retire(key)
                if call is not None:
                    reported = _logged(call.late, "reporting a late call")
                    with self._lock:
                        if reported is not False:  # reported, or failing to: the later calls wait behind it
                            self._calls.pop(key, None)
                        elif self._calls.get(key) and self._calls[key][0] is call:  # it finished meanwhile
                            self._calls[key].popleft()
            with self._lock:
                if not self._calls:  # a later watch() starts a new thread
                    self._thread = None
                    return

    def _retire(self, key: Hashable) -> _Call | None:
        """Drop ``key``'s finished calls; its oldest pending one if past its deadline, else None."""
        while True:
            with self._lock:
                calls = self._calls.get(key)
                if not calls:
                    self._calls.pop(key, None)
                    return None
                call = calls[0]
            if _finished(call):
                with self._lock:
                    calls.popleft()
                continue
            return call if time.monotonic() >= call.deadline else None


def _finished(call: _Call) -> bool:
    """Whether the call is done; one whose state cannot be read is logged and forgotten."""
    try:
        return call.done()
    except Exception:  # a CUDA error: the watchdog must go on for the other calls
        log.exception("interlace watchdog: cannot tell whether a call finished; no longer watching it")
        return True


def _logged(fn: Callable[[], object], what: str) -> object:
    """``fn()``, or None once its failure is logged."""
    try:
        return fn()
    except Exception:
        log.exception(f"interlace watchdog: {what} failed")
        return None


def _relax_capture() -> None:
    from interlace.engine.comm.native import native

    native().relax_capture_mode()


WATCHDOG = Watchdog(setup=_relax_capture)  # watches GPU calls only
