"""The watchdog: a call still running past its deadline is reported once; finished calls are forgotten."""

import logging
import threading
import time

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
    dog.watch(timely.is_set, start + 0.3, lambda: reports.append(("timely", time.monotonic() - start)))
    dog.watch(late.is_set, start + 0.5, lambda: reports.append(("late", time.monotonic() - start)))
    time.sleep(0.1)
    timely.set()
    assert wait_until(lambda: reports)
    time.sleep(0.2)  # many more polls: no second report
    assert [name for name, _ in reports] == ["late"] and 0.5 <= reports[0][1] < 5
    assert dog.pending() == 0
    late.set()


def test_finished_calls_are_forgotten():
    dog, done = Watchdog(poll=0.01), threading.Event()
    for _ in range(100):
        dog.watch(done.is_set, time.monotonic() + 60, lambda: None)
    assert dog.pending() == 100
    done.set()
    assert wait_until(lambda: dog.pending() == 0)


def test_a_report_that_fails_is_logged_and_the_watchdog_goes_on(caplog):
    dog, reports = Watchdog(poll=0.01), []

    def broken():
        raise RuntimeError("cannot read the flags")

    with caplog.at_level(logging.ERROR, logger="interlace.overlap"):
        dog.watch(lambda: False, time.monotonic(), broken)
        assert wait_until(lambda: "reporting a late call failed" in caplog.text)
        dog.watch(lambda: False, time.monotonic(), lambda: reports.append("second"))
        assert wait_until(lambda: reports == ["second"])
    assert "cannot read the flags" in caplog.text
