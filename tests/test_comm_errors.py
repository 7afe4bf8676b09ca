"""Bad input, disagreeing ranks, missing and dead ranks: clear errors, within deadlines, no hangs."""

import os
import re
import threading
import time

import pytest
import torch

from interlace.engine.comm import CollectiveMismatchError, CommTimeoutError, PeerFailedError, RankFailedError, spawn
from interlace.engine.comm.calls import make_call
from interlace.engine.device import finish_within, shared_queues

CPU = torch.device("cpu")
TRANSPORTS = ["local", "gloo", "symmetric"]


# --- validation of one rank's arguments: pure logic, no group needed -------------------------

BAD_CALLS = [
    ("reduce_scatter", dict(x=torch.ones(6, 2), op="sum"), ValueError, r"rank 1: reduce_scatter: x.shape\[0\] must be divisible by the world size 4, got shape \[6, 2\]"),
    ("all_to_all", dict(x=torch.ones(3)), ValueError, r"divisible by the world size 4, got shape \[3\]"),
    ("all_reduce", dict(x=torch.ones(2), op="min"), ValueError, r"op must be one of \('sum', 'avg', 'max'\), got 'min'"),
    ("all_reduce", dict(x=torch.ones(2, dtype=torch.int32), op="avg"), TypeError, r"op='avg' needs a floating dtype, `x` is torch.int32"),
    ("all_reduce", dict(x=torch.ones(2, dtype=torch.bool), op="sum"), TypeError, r"cannot reduce `x` of dtype torch.bool"),
    ("all_gather", dict(x=torch.ones(2, dtype=torch.complex64)), TypeError, r"`x` has dtype torch.complex64; supported"),
    ("all_gather", dict(x=[1.0, 2.0]), TypeError, r"`x` must be a torch.Tensor, got list"),
    ("all_gather", dict(x=torch.ones(2, device="meta")), ValueError, r"`x` is on meta, this group's device is cpu"),
    ("all_gather", dict(x=torch.tensor(1.0)), ValueError, r"`x` must have at least one dimension"),
    ("all_gather", dict(x=torch.ones(2, 3), out=torch.ones(8, 2)), ValueError, r"`out` must be float32\[8, 3\], got float32\[8, 2\]"),
    ("all_gather", dict(x=torch.ones(2, 3), out=torch.ones(8, 3, dtype=torch.float16)), ValueError, r"`out` must be float32\[8, 3\], got float16\[8, 3\]"),
    ("all_gather", dict(x=torch.ones(2, 3), out=torch.ones(3, 8).t()), ValueError, r"`out` must be contiguous"),
    ("reduce_scatter", dict(x=torch.ones(4), out=None, op="sum"), None, None),
    ("send", dict(x=torch.ones(2), peer=4), ValueError, r"peer must be a rank in \[0, 4\), got 4"),
    ("send", dict(x=torch.ones(2), peer=1), ValueError, r"peer 1 is this rank itself"),
    ("recv", dict(out=torch.ones(3, 2).t(), peer=0), ValueError, r"rank 1: recv: `out` must be contiguous"),
    ("all_gather", dict(x=torch.ones([1] * 9)), ValueError, r"has 9 dims; at most 8"),
]  # fmt: skip


@pytest.mark.parametrize("kind,kwargs,error,message", BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_arguments_name_rank_tensor_and_numbers(kind, kwargs, error, message):
    if error is None:  # the control case: a valid call passes
        assert make_call(kind, 1, 4, CPU, **kwargs).out.shape == (1,)
        return
    with pytest.raises(error, match=message):
        make_call(kind, 1, 4, CPU, **kwargs)


def test_in_place_only_for_all_reduce():
    x = torch.ones(4)
    assert make_call("all_reduce", 0, 2, CPU, x=x, out=x, op="sum").out is x
    with pytest.raises(ValueError, match="only all_reduce works in place"):
        make_call("all_to_all", 0, 2, CPU, x=x, out=x)


# --- ranks that disagree ------------------------------------------------------------------------


def mismatched(group, case):
    r = group.rank
    if case == "shape":
        group.all_reduce(torch.ones(2, 3 + r))
    elif case == "dtype":
        group.all_gather(torch.ones(2, dtype=torch.float32 if r == 0 else torch.float16))
    elif case == "kind":
        (group.all_reduce if r == 0 else group.all_gather)(torch.ones(2))
    elif case == "op":
        group.all_reduce(torch.ones(2), "sum" if r == 0 else "max")
    elif case == "p2p":
        if r == 0:
            group.send(torch.ones(4), 1)
        elif r == 1:
            group.recv(torch.empty(5), 0)


MISMATCH_MESSAGES = {
    "shape": r"all_reduce #1: ranks disagree: rank 0 called all_reduce\(float32\[2, 3\], op=sum\); rank 1 called all_reduce\(float32\[2, 4\], op=sum\)",
    "dtype": r"rank 0 called all_gather\(float32\[2\]\); rank 1 called all_gather\(float16\[2\]\)",
    "kind": r"rank 0 called all_reduce\(float32\[2\], op=sum\); rank 1 called all_gather\(float32\[2\]\)",
    "op": r"rank 0 called all_reduce\(float32\[2\], op=sum\); rank 1 called all_reduce\(float32\[2\], op=max\)",
    "p2p": r"rank 0 sends float32\[4\] but rank 1 receives into float32\[5\]",
}  # fmt: skip


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(MISMATCH_MESSAGES))
def test_ranks_that_disagree_get_every_rank_named(transport, case):
    # the p2p sender cannot know the receiver refused: it waits out its (short) deadline
    with pytest.raises(CollectiveMismatchError, match=MISMATCH_MESSAGES[case]):
        spawn(mismatched, 2, transport, timeout=1.5, deadline=30, args=(case,))


# --- a rank that never arrives, a rank that fails, a rank that dies ------------------------------


def one_rank_absent(group, timeout):
    if group.rank == group.world_size - 1:
        time.sleep(timeout * 2)  # alive but never arrives
        return None
    start = time.monotonic()
    try:
        group.all_reduce(torch.ones(3))
    except CommTimeoutError as error:
        return time.monotonic() - start, error.missing, str(error)
    return "no timeout"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_absent_rank_times_out_within_deadline_and_is_named(transport):
    timeout = 1.0
    results = spawn(one_rank_absent, 3, transport, timeout=timeout, deadline=60, args=(timeout,))
    for rank, (elapsed, missing, message) in enumerate(results[:2]):
        assert missing == [2], message
        assert timeout * 0.9 <= elapsed <= timeout + 1.5, f"rank {rank} gave up after {elapsed:.2f} s"
        assert f"all_reduce #1 on rank {rank} timed out after 1 s; peers not heard from: [2]" in message


def fails_on_rank_one(group):
    if group.rank == 1:
        raise ZeroDivisionError("rank one's own bug")
    start = time.monotonic()
    try:
        group.all_gather(torch.ones(2))
    except PeerFailedError as error:
        return time.monotonic() - start, str(error)
    return "no error"


def test_local_peers_of_a_failed_rank_fail_at_once():
    with pytest.raises(ZeroDivisionError, match="rank one's own bug"):
        spawn(fails_on_rank_one, 3, "local", timeout=60)


def waits_for_failed_peer(group):
    if group.rank == 1:
        raise ZeroDivisionError("rank one's own bug")
    start = time.monotonic()
    with pytest.raises(PeerFailedError, match=r"all_gather #1 on rank \d: waited for ranks \[1\], but rank 1 failed with ZeroDivisionError"):
        group.all_gather(torch.ones(2))
    assert time.monotonic() - start < 5, "peers must not wait out the 60 s deadline"


def test_local_failed_peer_is_named_not_waited_for():
    with pytest.raises(ZeroDivisionError):
        spawn(waits_for_failed_peer, 3, "local", timeout=60)


def test_local_ranks_learn_which_peer_failed_not_which_returned():
    """What a fused operator's GPU wait asks, so as not to wait out its deadline on flags that a
    failed peer thread will never raise."""
    seen, checked = [], threading.Event()

    def run(group):
        if group.rank == 1:
            checked.wait(10)
            raise ZeroDivisionError("rank one's own bug")
        if group.rank == 2:
            return
        deadline = time.monotonic() + 10
        while 2 not in group._hub.gone and time.monotonic() < deadline:  # marked gone just after its function returns
            time.sleep(0.01)
        assert 2 in group._hub.gone, "rank 2 returned but was never marked gone"
        seen.append(group.peer_failed())  # a peer that returned has not failed
        checked.set()
        while (why := group.peer_failed()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(why)

    with pytest.raises(ZeroDivisionError):
        spawn(run, 3, "local", timeout=60)
    assert seen == [None, "rank 1 failed with ZeroDivisionError: rank one's own bug"]


def dies_mid_run(group):
    group.barrier()
    if group.rank == 1:
        os._exit(3)
    group.all_reduce(torch.ones(2))


@pytest.mark.parametrize("transport", ["gloo", "symmetric"])
def test_dead_process_is_reported_with_exit_code(transport):
    start = time.monotonic()
    with pytest.raises(RankFailedError, match=r"rank 1 died \(exit code 3\) without reporting a result"):
        spawn(dies_mid_run, 3, transport, timeout=20, deadline=60)
    assert time.monotonic() - start < 15, "a dead rank must not cost the whole deadline"


# --- spawn misuse and error propagation ----------------------------------------------------------


def raises_value_error(group):
    if group.rank == 2:
        raise ValueError(f"bad value on rank {group.rank}")
    return group.rank


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rank_exception_is_reraised_with_its_traceback(transport):
    with pytest.raises(ValueError, match="bad value on rank 2") as info:
        spawn(raises_value_error, 3, transport, timeout=10)
    if transport == "gloo":
        assert re.search(r"traceback of rank 2.*raises_value_error", str(info.value.__cause__), re.S)


def returns_rank(group, offset):
    return group.rank + offset


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_results_come_back_in_rank_order(transport):
    assert spawn(returns_rank, 4, transport, args=(10,)) == [10, 11, 12, 13]


def never_finishes(group):
    if group.rank == 0:
        time.sleep(30)


def test_whole_run_deadline_names_unfinished_ranks():
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 2 still running after the 0.5 s deadline"):
        spawn(never_finishes, 2, "local", deadline=0.5)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(world_size=0), ValueError, "world_size must be a positive int, got 0"),
        (dict(world_size=2, backend="mpi"), ValueError, "backend must be one of"),
        (dict(world_size=2, backend="gloo", fn=lambda g: 0), TypeError, "use a module-level function"),
        (dict(world_size=2, backend="gloo", device="cuda"), ValueError, r"backend='gloo' runs its ranks on CPU tensors, got device='cuda'"),
        (dict(world_size=2, backend="nccl", device="cpu"), ValueError, r"backend='nccl' runs its ranks on CUDA tensors, got device='cpu'"),
    ],
)
def test_spawn_rejects_bad_arguments(kwargs, error, message):
    kwargs = {"fn": returns_rank, **kwargs}
    with pytest.raises(error, match=message):
        spawn(kwargs.pop("fn"), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("backend,device", [("nccl", None), ("local", "cuda"), ("symmetric", "cuda:0")])
def test_a_gpu_backend_or_device_without_a_gpu_says_so(backend, device):
    with pytest.raises(RuntimeError, match=rf"backend='{backend}' with device={device!r} needs a CUDA GPU, and torch.cuda.is_available\(\) is False"):
        spawn(returns_rank, 2, backend, device=device)



@pytest.mark.parametrize("environ,queues", [({}, 8), ({"CUDA_DEVICE_MAX_CONNECTIONS": "16"}, 16), ({"CUDA_DEVICE_MAX_CONNECTIONS": "64"}, 32)])
def test_more_streams_than_hardware_queues_are_named(environ, queues):
    assert shared_queues(queues, environ) is None
    why = shared_queues(queues + 1, environ)
    assert why.startswith(f"{queues + 1} streams on one GPU but CUDA_DEVICE_MAX_CONNECTIONS")
    assert ("use fewer ranks per GPU" if queues == 32 else "set CUDA_DEVICE_MAX_CONNECTIONS=32 before CUDA starts") in why


def test_a_malformed_queue_setting_is_named():
    assert "'lots' is not an integer" in shared_queues(2, {"CUDA_DEVICE_MAX_CONNECTIONS": "lots"})


@pytest.mark.gpu
def test_rank_threads_with_more_streams_than_queues_warn():
    # conftest sets CUDA_DEVICE_MAX_CONNECTIONS=32: 16 ranks need 33 streams
    with pytest.warns(RuntimeWarning, match="LocalGroup with 16 ranks: 33 streams on one GPU .* use fewer ranks per GPU"):
        assert spawn(lambda group: group.rank, world_size=16, backend="local", device="cuda") == list(range(16))


def test_a_blocking_call_past_its_deadline_is_a_timeout_naming_it():
    """What closing a symmetric buffer waits with: the device drain on a helper thread."""
    never = threading.Event()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^synchronizing cuda:0 \(rank 1 closing\) did not finish within 0.2 s"):
        finish_within(never.wait, 0.2, "synchronizing cuda:0 (rank 1 closing)")
    assert time.monotonic() - start < 2
    never.set()
    assert finish_within(lambda: 7, 1.0, "a quick call") == 7
    with pytest.raises(ZeroDivisionError):
        finish_within(lambda: 1 / 0, 1.0, "a failing call")
