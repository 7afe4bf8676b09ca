"""Late GPU work is named even when nothing on the host waits for it.

A fused call on a GPU with ``check=False`` returns once its work is queued, and its stream waits
have no deadline of their own: a peer that never raises a flag would leave the streams blocked
without a word, and the host would hang later in some unrelated synchronisation. The watchdog,
one daemon thread per process, follows such calls by their completion (a CUDA event). When one is
still running past its deadline, it calls the call's ``late`` once, which says who waited on what.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

POLL = 0.05  # seconds between looks; deadlines are seconds to minutes
log = logging.getLogger("interlace.overlap")


@dataclass(slots=True)
class _Call:
    done: Callable[[], bool]
    deadline: float
    late: Callable[[], None]


class Watchdog:
    def __init__(self, poll: float = POLL):
        self.poll = poll
        self._calls: list[_Call] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, done: Callable[[], bool], deadline: float, late: Callable[[], None]) -> None:
        """Call ``late()`` (on the watchdog's thread) if ``done()`` is still false at ``deadline``
        (``time.monotonic()``); forget the call once ``done()`` is true."""
        with self._lock:
            self._calls.append(_Call(done, deadline, late))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="interlace watchdog")
                self._thread.start()

    def pending(self) -> int:
        with self._lock:
            return len(self._calls)

    def _run(self) -> None:
        while True:
            time.sleep(self.poll)
            with self._lock:
                calls, self._calls = self._calls, []
            now, keep = time.monotonic(), []
            for call in calls:
                if call.done():
                    continue
                if now < call.deadline:
                    keep.append(call)
                    continue
                try:
                    call.late()
                except Exception:  # the watchdog must outlive a report that fails
                    log.exception("interlace watchdog: reporting a late call failed")
            with self._lock:
                self._calls[:0] = keep


WATCHDOG = Watchdog()
