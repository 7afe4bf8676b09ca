"""Conformance of every collective on every transport, world sizes 1-4, against float64 references.

Each rank regenerates all ranks' inputs (reference.py), so its check is independent of the
transport. Several iterations run through the same group with fresh inputs; outputs passed as
`out=` are poisoned first, and one all_reduce iteration runs in place. One group per transport and
world size runs every collective in turn (a group per collective spent most of its time starting
processes). A failure names the rank, collective, dtype and iteration, and stops that group's
later collectives.
"""

import pytest
import torch

from interlace.engine.comm import spawn
from reference import (
    DTYPES, assert_exact, assert_reduction_close, poison, rank_input, reduce64, rows, step_shape,
)  # fmt: skip

ITERATIONS = 3
TRANSPORTS = {  # id -> (backend, device, check), world sizes, marks
    "local": (("local", "cpu", True), [1, 2, 3, 4], []),
    "gloo": (("gloo", None, True), [1, 2, 3, 4], []),
    "gloo-nocheck": (("gloo", None, False), [2, 4], []),  # the unchecked DistGroup path
    "symmetric": (("symmetric", "cpu", True), [1, 2, 3, 4], []),  # POSIX shared memory
    "local-cuda": (("local", "cuda", True), [1, 2, 3, 4], [pytest.mark.gpu]),
    "nccl": (("nccl", None, True), [1, 2, 3, 4], [pytest.mark.gpu]),
    "symmetric-cuda": (("symmetric", "cuda", True), [1, 2, 3, 4], [pytest.mark.gpu]),  # CUDA IPC, ranks on one GPU
}
CASES = [
    pytest.param(transport, world_size, id=f"{name}-{world_size}", marks=marks)
    for name, (transport, world_sizes, marks) in TRANSPORTS.items()
    for world_size in world_sizes
]


def run(transport, fn, world_size, *args):
    backend, device, check = transport
    # the deadline within the GPU session's pytest --timeout=120, which would kill the run unexplained
    return spawn(fn, world_size, backend, timeout=30, deadline=100, args=args, device=device, check=check)


def inputs(group, seed, it, shape, dtype):
    """Every rank's input for this step, on the group's device."""
    return [rank_input(seed, it, r, shape, dtype).to(group.device) for r in range(group.world_size)]


def output_buffer(group, it, shape, dtype):
    """Alternate between letting the transport allocate and a poisoned caller buffer."""
    return None if it % 2 == 0 else poison(torch.empty(shape, dtype=dtype, device=group.device))


def check_all_gather(group, seed):
    checks = 0
    for dtype in DTYPES:
        for it in range(ITERATIONS):
            shape = step_shape(seed, it, 1, ndim=3)
            xs = inputs(group, seed, it, shape, dtype)
            out = output_buffer(group, it, (shape[0] * group.world_size, *shape[1:]), dtype)
            got = group.all_gather(xs[group.rank], out=out)
            assert_exact(got.cpu(), torch.cat(xs).cpu(), f"rank {group.rank} all_gather {dtype} it {it}")
            checks += 1
    return checks


def check_all_to_all(group, seed):
    checks, w, r = 0, group.world_size, group.rank
    for dtype in DTYPES:
        for it in range(ITERATIONS):
            shape = step_shape(seed, it, w)
            xs = inputs(group, seed, it, shape, dtype)
            got = group.all_to_all(xs[r], out=output_buffer(group, it, shape, dtype))
            expected = torch.cat([rows(x_q, r, w) for x_q in xs])
            assert_exact(got.cpu(), expected.cpu(), f"rank {r} all_to_all {dtype} it {it}")
            checks += 1
    return checks


def check_reduction(group, seed, kind, op):
    checks, w, r = 0, group.world_size, group.rank
    for dtype in DTYPES:
        if op == "avg" and not dtype.is_floating_point:
            continue
        for it in range(ITERATIONS):
            shape = step_shape(seed, it, w, ndim=3)
            xs = inputs(group, seed, it, shape, dtype)
            what = f"rank {r} {kind}({op}) {dtype} it {it}"
            if kind == "all_reduce":
                x = xs[r].clone()
                out = x if it == 2 else output_buffer(group, it, shape, dtype)  # it 2: in place
                got, parts = group.all_reduce(x, op, out=out), [x_q.cpu() for x_q in xs]
            else:
                out = output_buffer(group, it, (shape[0] // w, *shape[1:]), dtype)
                got, parts = group.reduce_scatter(xs[r], op, out=out), [rows(x_q, r, w).cpu() for x_q in xs]
            assert_reduction_close(got.cpu(), parts, op, what)
            checks += 1
    return checks


def check_send_recv(group, seed):
    """A ring: two messages in flight to the next rank, received in order from the previous."""
    checks, w, r = 0, group.world_size, group.rank
    nxt, prev = (r + 1) % w, (r - 1) % w
    for dtype in DTYPES:
        for it in range(ITERATIONS):
            shape = step_shape(seed, it, w)
            first = rank_input(seed, it, r, shape, dtype).to(group.device)
            second = rank_input(seed + 1, it, r, shape, dtype).to(group.device)
            sends = [group.send_async(first, nxt), group.send_async(second, nxt)]
            bufs = [poison(torch.empty(shape, dtype=dtype, device=group.device)) for _ in range(2)]
            recvs = [group.recv_async(buf, prev) for buf in bufs]
            got = [work.wait() for work in recvs]
            for work in sends:
                work.wait()
            assert_exact(got[0].cpu(), rank_input(seed, it, prev, shape, dtype), f"rank {r} recv 1 {dtype} it {it}")
            assert_exact(got[1].cpu(), rank_input(seed + 1, it, prev, shape, dtype), f"rank {r} recv 2 {dtype} it {it}")
            checks += 2
    return checks


def check_sendrecv(group, seed):
    """One ring step per iteration: every rank sends to the next and receives from the previous."""
    checks, w, r = 0, group.world_size, group.rank
    for dtype in DTYPES:
        for it in range(ITERATIONS):
            shape = step_shape(seed, it, w)
            x = rank_input(seed, it, r, shape, dtype).to(group.device)
            got = group.sendrecv(x, (r + 1) % w, poison(torch.empty(shape, dtype=dtype, device=group.device)), (r - 1) % w)
            assert_exact(got.cpu(), rank_input(seed, it, (r - 1) % w, shape, dtype), f"rank {r} sendrecv {dtype} it {it}")
            checks += 1
    return checks


def check_barrier(group, seed):
    """No rank leaves before the last one arrives (ranks arrive staggered)."""
    import time

    time.sleep(0.02 * group.rank)
    arrived = time.time()
    group.barrier()
    left = time.time()
    stamps = group.all_gather(torch.tensor([[arrived, left]], dtype=torch.float64, device=group.device)).cpu()
    assert stamps[:, 1].min() >= stamps[:, 0].max(), f"rank {group.rank} barrier: a rank left early: {stamps.tolist()}"
    return 1


def expected_checks(kind, op):
    """How many comparisons a rank must have made: the test cannot pass by checking nothing."""
    if kind == "barrier":
        return 1
    dtypes = len(DTYPES) - (op == "avg")  # avg is for floating dtypes only
    return dtypes * ITERATIONS * (2 if kind == "send_recv" else 1)


COLLECTIVES = [
    ("all_gather", None), ("all_to_all", None), ("all_reduce", "sum"), ("all_reduce", "avg"),
    ("all_reduce", "max"), ("reduce_scatter", "sum"), ("reduce_scatter", "avg"), ("reduce_scatter", "max"),
    ("send_recv", None), ("sendrecv", None), ("barrier", None),
]  # fmt: skip


def collectives(world_size):
    """What a group of ``world_size`` ranks can run: send/recv needs a peer (a send to oneself is
    rejected, test_comm_errors)."""
    return [(kind, op) for kind, op in COLLECTIVES if world_size > 1 or kind not in ("send_recv", "sendrecv")]


def label(kind, op):
    return f"{kind}({op})" if op else kind


def conformance(group, seed):
    """Every collective in turn through one group: the checks each made, by name."""
    counts = {}
    for kind, op in collectives(group.world_size):
        reduction = kind in ("all_reduce", "reduce_scatter")
        checks = check_reduction(group, seed, kind, op) if reduction else globals()[f"check_{kind}"](group, seed)
        counts[label(kind, op)] = checks
    return counts


@pytest.mark.parametrize("transport,world_size", CASES)
def test_every_collective(transport, world_size, seed):
    counts = run(transport, conformance, world_size, seed)
    expected = {label(kind, op): expected_checks(kind, op) for kind, op in collectives(world_size)}
    assert counts == [expected] * world_size


def test_tolerance_can_fail(seed):
    """The reduction tolerance is tight enough to catch a rank's contribution going missing."""
    for dtype in (torch.float32, torch.bfloat16):
        parts = [rank_input(seed, 0, r, (64,), dtype) for r in range(4)]
        exact = reduce64(parts, "sum").to(dtype)
        assert_reduction_close(exact, parts, "sum", "exact result")
        with pytest.raises(AssertionError, match="outside tolerance"):
            assert_reduction_close(reduce64(parts[:3], "sum").to(dtype), parts, "sum", "rank 3 dropped")
