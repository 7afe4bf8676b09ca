"""The watchdog: a call still running past its deadline is reported once; finished calls are
forgotten; the thread runs only while calls are pending and survives what it cannot read."""

import logging
import threading
import time

import pytest
import torch

from interlace.engine.overlap.watchdog import Watchdog


def wait_until(condition, limit=10.0):
    end = time.monotonic() + limit
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_a_late_call_is_reported_once_after_its_deadline_and_a_timely_one_never():
    dog, reports = Watchdog(poll=0.01), []
    timely, late = threading.Event(), threading.Event()
    start = time.monotonic()
    dog.watch("a", timely.is_set, start + 0.3, lambda: reports.append(("timely", time.monotonic() - start)))
    dog.watch("b", late.is_set, start + 0.5, lambda: reports.append(("late", time.monotonic() - start)))
    time.sleep(0.1)
    timely.set()
    assert wait_until(lambda: reports)
    time.sleep(0.2)  # many more polls: no second report
    assert [name for name, _ in reports] == ["late"] and 0.5 <= reports[0][1] < 5
    assert dog.pending() == 0
    late.set()


def test_calls_behind_a_late_one_are_not_reported_again_and_other_keys_go_on():
    dog, reports = Watchdog(poll=0.01), []
    now = time.monotonic()
    for i in range(3):  # one operator's calls: the first is late, the others wait behind it
        dog.watch("op", lambda: False, now + 0.2 + 0.5 * i, lambda i=i: reports.append(("op", i)))
    other = threading.Event()
    dog.watch("other", other.is_set, now + 1.5, lambda: reports.append(("other", 0)))
    assert wait_until(lambda: ("other", 0) in reports)
    assert reports == [("op", 0), ("other", 0)]


def test_a_call_found_finished_when_reported_leaves_the_next_one_watched():
    """``late`` re-checks and declines (False): the call finished meanwhile; the one behind it
    never finishes and must still be reported."""
    dog, reports = Watchdog(poll=0.01), []

    def declines():
        reports.append("first")
        return False

    now = time.monotonic()
    dog.watch("op", lambda: False, now, declines)
    dog.watch("op", lambda: False, now + 0.3, lambda: reports.append("second"))
    assert wait_until(lambda: "second" in reports)
    assert reports == ["first", "second"] and dog.pending() == 0


def test_finished_calls_are_forgotten_and_the_thread_stops_when_none_is_pending():
    dog, done = Watchdog(poll=0.01), threading.Event()
    for i in range(100):
        dog.watch(i % 3, done.is_set, time.monotonic() + 60, lambda: None)
    assert dog.pending() == 100
    done.set()
    assert wait_until(lambda: dog.pending() == 0 and dog._thread is None)
    reports = []
    dog.watch("again", lambda: False, time.monotonic(), lambda: reports.append(1))  # a new thread
    assert wait_until(lambda: reports == [1])


def test_what_fails_in_the_watchdog_is_logged_and_it_goes_on(caplog):
    dog, reports = Watchdog(poll=0.01, setup=lambda: 1 / 0), []

    def broken_report():
        raise RuntimeError("cannot read the flags")

    def broken_query():
        raise RuntimeError("CUDA error: an illegal memory access")

    with caplog.at_level(logging.ERROR, logger="interlace.overlap"):
        dog.watch("a", lambda: False, time.monotonic(), broken_report)
        dog.watch("b", broken_query, time.monotonic() + 60, lambda: reports.append("b"))
        assert wait_until(lambda: "reporting a late call failed" in caplog.text and dog.pending() == 0)
        dog.watch("c", lambda: False, time.monotonic(), lambda: reports.append("c"))
        assert wait_until(lambda: reports == ["c"])
    for text in ("setting up the watchdog's thread failed", "ZeroDivisionError", "cannot read the flags",
                 "cannot tell whether a call finished", "an illegal memory access"):  # fmt: skip
        assert text in caplog.text, text


@pytest.mark.gpu
def test_the_watchdog_polls_beside_a_global_mode_capture_without_invalidating_it():
    """An event query from a thread in the default capture mode would invalidate a global-mode
    capture on another thread; the watchdog's thread is relaxed, so the capture survives."""
    from interlace.engine.comm import signals
    from interlace.engine.device import new_stream
    from interlace.engine.overlap.watchdog import _relax_capture

    dev = torch.device("cuda", torch.cuda.current_device())
    flags = torch.zeros(1, dtype=torch.int32, device=dev)
    blocked = new_stream(dev)
    signals.wait(flags, 0, 1, blocked)  # pending until the flag is raised, after the capture
    pending, polls = blocked.record_event(), []

    def query():
        polls.append(time.monotonic())
        return pending.query()

    dog = Watchdog(poll=0.002, setup=_relax_capture)
    dog.watch("blocked", query, time.monotonic() + 60, lambda: True)
    x = torch.randn(4096, device=dev)
    capturing, graph = new_stream(dev), torch.cuda.CUDAGraph()
    capturing.wait_stream(torch.cuda.current_stream(dev))
    try:
        with torch.cuda.stream(capturing):  # not torch.cuda.graph(): it synchronises the device, which waits on `blocked`
            graph.capture_begin(capture_error_mode="global")
            y, adds = x * 2, 0
            start = time.monotonic()
            while time.monotonic() - start < 0.3:
                y, adds = y + 1, adds + 1
                time.sleep(0.01)
            graph.capture_end()
        assert sum(start <= t <= time.monotonic() for t in polls) > 10  # it polled during the capture
    finally:  # `blocked` released whatever happened: a stream left blocked would hold back the next tests
        signals.write(flags, 0, 1, new_stream(dev))
    with torch.cuda.stream(capturing):
        graph.replay()
        done = capturing.record_event()
    done.synchronize()
    assert torch.allclose(y, x * 2 + adds) and wait_until(lambda: dog.pending() == 0)
