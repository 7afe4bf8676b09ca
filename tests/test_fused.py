"""Fused overlap (one GEMM launch + symmetric memory + flags) on CPU: rank threads (LocalGroup)
and processes sharing memory (SymmetricGroup), under the Triton interpreter. Several epochs through
the same workspace with fresh rank-dependent inputs, against float64; the flags exactly."""

import re
import time

import pytest
import torch

from interlace.engine.comm import spawn
from interlace.engine.overlap.fused import (
    FusedAllGatherMatmul, FusedAllReduceResidualNorm, FusedMatmulAllReduce, FusedMatmulReduceScatter, fused_unavailable,
)  # fmt: skip
from reference import assert_within, matmul_tolerance, rand

base_rand = rand

ROWS, K, N, EPOCHS = 8, 24, 40, 3
TRANSPORTS = (
    [pytest.param("local", w, "cpu", id=f"local-{w}") for w in (1, 2, 3)]
    + [pytest.param("symmetric", w, "cpu", id=f"symmetric-{w}") for w in (2, 3)]
    + [pytest.param("local", w, "cuda", id=f"local-cuda-{w}", marks=pytest.mark.gpu) for w in (2, 4, 8)]
    + [pytest.param("symmetric", 2, "cuda", id="cuda-ipc-2", marks=pytest.mark.gpu)]
)


def d64(t):
    return t.detach().cpu().to(torch.float64)


def fused_matmuls(group, seed):
    w, r = group.world_size, group.rank

    def rand(s, shape):  # fresh, rank-independent data, on the group's device
        return base_rand(s, shape).to(group.device)

    with (
        FusedAllGatherMatmul(group, ROWS, K, torch.float32) as ag,
        FusedMatmulReduceScatter(group, ROWS, N, torch.float32) as rs,
        FusedMatmulAllReduce(group, w * ROWS, N, torch.float32, 3) as ar,
    ):
        for e in range(1, EPOCHS + 1):
            xs = [rand(seed + 100 * e + q, (ROWS, K)) * (q + 1) for q in range(w)]
            weights = [rand(seed + 7 * e, (N, K)), rand(seed + 9 * e, (N // 2, K))]
            y, y2 = ag(xs[r], weights)
            x_full = torch.cat(xs)
            for out, wt in ((y, weights[0]), (y2, weights[1])):
                assert_within(out.cpu(), d64(x_full) @ d64(wt).T, matmul_tolerance(d64(x_full).abs() @ d64(wt).abs().T, torch.float32, K, 1), f"AG e{e}")
            assert ag.buffer.flags(r).tolist() == [e] * w
            xk = [rand(seed + 300 * e + q, (w * ROWS, K)) * (q + 1) for q in range(w)]
            wk = [rand(seed + 500 * e + q, (N, K)) for q in range(w)]
            exact = sum(d64(xk[q]) @ d64(wk[q]).T for q in range(w))
            mag = sum(d64(xk[q]).abs() @ d64(wk[q]).abs().T for q in range(w))
            rows = slice(r * ROWS, (r + 1) * ROWS)
            assert_within(rs(xk[r], wk[r]).cpu(), exact[rows], matmul_tolerance(mag[rows], torch.float32, K, w + 1), f"RS e{e}")
            assert_within(ar(xk[r], wk[r]).cpu(), exact, matmul_tolerance(mag, torch.float32, K, w + 1), f"AR e{e}")
            tiles = rs._plan(xk[r], wk[r]).tiles_per_chunk(w * ROWS, N, ROWS)
            assert rs.buffer.flags(r).tolist() == [e * t for t in tiles] + [e]  # tile counters, then DONE
    return True


@pytest.mark.parametrize("transport,world_size,device", TRANSPORTS)
def test_fused_all_gather_reduce_scatter_all_reduce(transport, world_size, device, seed):
    assert spawn(fused_matmuls, world_size, transport, timeout=120, device=device, args=(seed,)) == [True] * world_size


def captured(group):
    with FusedMatmulAllReduce(group, 16, N, torch.float32) as op:
        x, w = torch.randn(16, K, device="cuda"), torch.randn(N, K, device="cuda")
        op(x, w)  # eager works
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph yet"), torch.cuda.graph(graph):
            op(x, w)
    return True


def close_right_after(group):
    """No host sync between the last call and close(): close must not free memory still in use."""
    for _ in range(3):
        op = FusedMatmulReduceScatter(group, ROWS, N, torch.float32, check=False)
        out = op(torch.randn(group.world_size * ROWS, K, device="cuda"), torch.randn(N, K, device="cuda"))
        op.close()
    return bool(torch.isfinite(out).all())


@pytest.mark.gpu
def test_closing_right_after_a_call_is_safe():
    assert spawn(close_right_after, 4, "local", device="cuda", timeout=120) == [True] * 4


@pytest.mark.gpu
def test_fused_refuses_cuda_graph_capture_instead_of_replaying_stale_epochs():
    assert spawn(captured, 2, "local", device="cuda", timeout=120) == [True, True]


def fused_norm(group, seed):
    w, r, hidden = group.world_size, group.rank, 48
    outs = []
    with FusedAllReduceResidualNorm(group, 3, hidden, torch.float32) as op:
        for e in range(EPOCHS):
            parts = [rand(seed + 10 * e + q, (3, hidden)) for q in range(w)]
            residual, weight = rand(seed + 99 * e, (3, hidden)), rand(seed + 98 * e, (hidden,)).abs() + 0.5
            out, h = op(residual, weight, parts[r])
            h64 = d64(residual) + sum(d64(p) for p in parts)
            ref = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5) * d64(weight)
            assert_within(h, h64, 4 * w * torch.finfo(torch.float32).eps * (d64(residual).abs() + sum(d64(p).abs() for p in parts)), "h")
            assert (d64(out) - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
            outs.append((out.clone(), h.clone()))
    return outs


@pytest.mark.parametrize("transport,world_size", [("local", 3), ("symmetric", 2)])
def test_fused_all_reduce_residual_norm_gives_every_rank_the_same_bits(transport, world_size, seed):
    per_rank = spawn(fused_norm, world_size, transport, timeout=120, args=(seed,))
    for outs in per_rank[1:]:
        assert all(torch.equal(a, b) and torch.equal(ha, hb) for (a, ha), (b, hb) in zip(outs, per_rank[0]))


def silent_peer(group, pattern):
    """Rank 1 sets the workspace up, then never calls: rank 0 must give up, naming what it waited on."""
    w = group.world_size
    make = {"ag": lambda: FusedAllGatherMatmul(group, ROWS, K, torch.float32, max_spins=300),
            "rs": lambda: FusedMatmulReduceScatter(group, ROWS, N, torch.float32)}[pattern]  # fmt: skip
    op = make()
    if group.rank == 1:
        time.sleep(3 * group.timeout)
        return None
    start = time.monotonic()
    try:
        if pattern == "ag":
            op(rand(0, (ROWS, K)), [rand(1, (N, K))])
        else:
            op(rand(0, (w * ROWS, K)), rand(1, (N, K)))
    except TimeoutError as error:
        return time.monotonic() - start, str(error)
    finally:
        op.buffer.abandon()
    return "no error"


@pytest.mark.parametrize("pattern,message", [
    ("ag", r"AG\+GEMM rank 0: wait on chunk 1 timed out: expected flag >= 1, observed 0"),
    ("rs", r"GEMM\+RS rank 0: rank 1's tiles of chunk 0, epoch 1: flag 0 did not reach \d+ within [\d.]+ s \(observed 0\)"),
])  # fmt: skip
def test_a_silent_peer_is_named_not_waited_for_forever(pattern, message):
    elapsed, text = spawn(silent_peer, 2, "local", timeout=2.0, args=(pattern,))[0]
    assert re.search(message, text), text
    assert elapsed < 30


def test_fused_says_why_it_cannot_run_or_be_timed():
    class FakeDist:  # what fused_unavailable reads off a DistGroup
        world_size, rank = 4, 0

    assert "under the Triton interpreter a timing measures Python" in fused_unavailable(FakeDist(), timing=True)
    assert "ranks may span nodes (LOCAL_WORLD_SIZE=unset, world 4)" in fused_unavailable(FakeDist())
