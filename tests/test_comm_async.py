"""Async handles are really in flight while the caller works: asserted by ordering, never by speed."""

import time

import pytest
import torch

from interlace.engine.comm import spawn

DEADLINE = 10.0
LATE = 0.3  # rank 1 contributes this long after rank 0 issued


def issue_then_poll(group, op):
    """Rank 0 issues and then only polls; rank 1 contributes late. Returns rank 0's timeline."""
    x = torch.full((group.world_size * 4, 3), float(group.rank + 1))
    if group.rank == 1:
        time.sleep(LATE)
        contributed = time.time()
        getattr(group, op)(x)
        return {"contributed": contributed}
    work = getattr(group, f"{op}_async")(x)
    issued = time.time()
    seen_pending = not work.is_completed()
    end = time.monotonic() + DEADLINE
    while not work.is_completed():  # nobody calls wait(): progress must come from elsewhere
        if time.monotonic() > end:
            raise AssertionError(f"{op} never completed without wait()")
        torch.mm(torch.randn(64, 64), torch.randn(64, 64))  # the caller's own work
    completed = time.time()
    result = work.wait()
    return {"issued": issued, "seen_pending": seen_pending, "completed": completed, "sum": result.sum().item()}


@pytest.mark.parametrize("transport", [("local", True), ("gloo", False), ("symmetric", True)], ids=["local", "gloo-nocheck", "symmetric"])
@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
def test_async_work_progresses_while_the_caller_works(transport, op):
    backend, check = transport
    r0, r1 = spawn(issue_then_poll, 2, backend, timeout=DEADLINE, check=check, args=(op,))
    assert r0["issued"] < r1["contributed"], "issuing must not wait for the peer"
    assert r0["seen_pending"], "the work cannot be complete before the peer contributed"
    assert r0["completed"] >= r1["contributed"], "completion observed only after the peer contributed"
    expected = {"all_reduce": 3 * 24, "all_gather": 3 * 24, "reduce_scatter": 3 * 12, "all_to_all": 12 + 24}[op]
    assert r0["sum"] == expected


def test_checked_dist_issue_is_a_rendezvous():
    """With check=True, issuing waits until every rank has issued the same call (DistGroup docs)."""
    r0, r1 = spawn(issue_then_poll, 2, "gloo", timeout=DEADLINE, check=True, args=("all_reduce",))
    assert r0["issued"] >= r1["contributed"]
    assert r0["sum"] == 3 * 24


def recv_posted_early(group):
    """The receive is posted before the matching send exists; the sender sends late."""
    if group.rank == 0:
        time.sleep(LATE)
        group.send(torch.arange(6.0), 1)
        return None
    start = time.monotonic()
    work = group.recv_async(torch.empty(6), 0)
    posting = time.monotonic() - start
    return posting, work.wait().tolist()


@pytest.mark.parametrize("transport", [("local", True), ("gloo", True), ("gloo", False), ("symmetric", True)], ids=["local", "gloo", "gloo-nocheck", "symmetric"])
def test_receive_can_be_posted_before_the_send(transport):
    backend, check = transport
    _, (posting, got) = spawn(recv_posted_early, 2, backend, timeout=DEADLINE, check=check)
    assert posting < LATE / 2, f"posting the receive took {posting:.3f} s: it waited for the send"
    assert got == list(range(6))
