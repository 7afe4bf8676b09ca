"""Fused overlap (one GEMM launch + symmetric memory + flags) on CPU: rank threads (LocalGroup)
and processes sharing memory (SymmetricGroup), under the Triton interpreter. Several epochs through
the same workspace with fresh rank-dependent inputs, against float64; the flags exactly."""

import dataclasses
import os
import re
import time

import pytest
import torch

from interlace.engine.comm import spawn
from interlace.engine.device import drain_within, new_stream
from interlace.ops import flags as epoch_flags
from interlace.ops.gemm import INTERPRETING
from interlace.ops.reduce import unsupported
from interlace.ops.flags import EpochValue
from interlace.engine.overlap.fused import (
    FusedAllGatherMatmul, FusedAllReduceResidualNorm, FusedMatmulAllReduce, FusedMatmulAllReduceTwoShot, FusedMatmulGroupAllReduce,
    FusedMatmulReduceScatter, agreed_failure, check_workspaces, close_workspaces, fused_unavailable, workspace,
)  # fmt: skip
from reference import assert_within, matmul_tolerance, rand

base_rand = rand

ROWS, K, N, EPOCHS = 8, 24, 40, 3
# The group's deadline: interpreted kernels are slow; on a GPU a call takes milliseconds, its first
# one seconds (compiling), and the deadline must fire (naming who waited on what) well before the
# pytest timeout that tools/gpu_session.py sets, which kills the whole run.
DEADLINE = 60.0 if torch.cuda.is_available() else 120.0
CPU = pytest.mark.interpreter
TRANSPORTS = (
    [pytest.param("local", w, "cpu", id=f"local-{w}", marks=CPU) for w in (1, 2, 3, 4, 8)]
    + [pytest.param("symmetric", w, "cpu", id=f"symmetric-{w}", marks=CPU) for w in (2, 3)]
    + [pytest.param("local", w, "cuda", id=f"local-cuda-{w}", marks=pytest.mark.gpu) for w in (2, 4, 8)]
    + [pytest.param("symmetric", 2, "cuda", id="cuda-ipc-2", marks=pytest.mark.gpu)]
)


def d64(t):
    return t.detach().cpu().to(torch.float64)


def fused_matmuls(group, seed, graph_safe=False):
    w, r = group.world_size, group.rank

    def rand(s, shape):  # fresh, rank-independent data, on the group's device
        return base_rand(s, shape).to(group.device)

    with (
        FusedAllGatherMatmul(group, ROWS, K, torch.float32, graph_safe=graph_safe) as ag,
        FusedMatmulReduceScatter(group, ROWS, N, torch.float32, graph_safe=graph_safe) as rs,
        FusedMatmulAllReduce(group, w * ROWS, N, torch.float32, 3, graph_safe=graph_safe) as ar,
    ):
        for op in (rs, ar):  # what a GPU reduces with the one-pass kernel (checked there when the operator is made)
            parts = op._parts()
            assert unsupported(parts, torch.empty_like(parts[0])) is None
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
            outputs = [ROWS * N] * w  # what each block's counter gains per call
            assert rs.buffer.flags(r).tolist() == [e * t for t in outputs] + [e]  # signal counters, then DONE
            assert [op.epoch_now.item() for op in (ag, rs, ar)] == [e] * 3
    return True


@pytest.mark.parametrize("transport,world_size,device", TRANSPORTS)
def test_fused_all_gather_reduce_scatter_all_reduce(transport, world_size, device, seed):
    assert spawn(fused_matmuls, world_size, transport, timeout=DEADLINE, device=device, args=(seed,)) == [True] * world_size


def two_shot(group, seed, graph_safe=False):
    """Two-shot GEMM+AR over several epochs against float64, with the bits of the one-shot operator
    on every rank (each element is summed once, in rank order, by one owner), and its flags exactly.
    Uneven pieces (a chunk's rows do not split evenly among ranks), and a few rows in 2 chunks, so
    that at W >= 3 most pieces are empty."""
    w, r, chunks = group.world_size, group.rank, 3
    for m in (w * ROWS + 5, 2):
        with (
            FusedMatmulAllReduceTwoShot(group, m, N, torch.float32, chunks, graph_safe=graph_safe) as two,
            FusedMatmulAllReduce(group, m, N, torch.float32, chunks, graph_safe=graph_safe) as one,
        ):
            step = -(-m // chunks)
            outputs = [min(step, m - c * step) * N for c in range(two.chunks)]
            for e in range(1, EPOCHS + 1):
                xk = [base_rand(seed + 300 * e + q, (m, K)).to(group.device) * (q + 1) for q in range(w)]
                wk = [base_rand(seed + 500 * e + q, (N, K)).to(group.device) for q in range(w)]
                exact = sum(d64(xk[q]) @ d64(wk[q]).T for q in range(w))
                mag = sum(d64(xk[q]).abs() @ d64(wk[q]).abs().T for q in range(w))
                y = two(xk[r], wk[r])
                assert_within(y.cpu(), exact, matmul_tolerance(mag, torch.float32, K, w + 1), f"two-shot AR m{m} e{e}")
                assert torch.equal(y, one(xk[r], wk[r])), f"two-shot and one-shot differ, m {m} e{e}"
                assert all(torch.equal(y, other) for other in group.all_gather(y[None])), "ranks differ"
                assert two.buffer.flags(r).tolist() == [e * t for t in outputs] + [e] * (two.chunks + 1)  # counters, REDUCED, DONE
    return True


@pytest.mark.parametrize("transport,world_size,device,graph_safe", [
    *(pytest.param("local", w, "cpu", False, id=f"local-{w}", marks=CPU) for w in (1, 2, 3, 8)),
    pytest.param("symmetric", 3, "cpu", False, id="symmetric-3", marks=CPU),
    pytest.param("local", 2, "cpu", True, id="graph-safe-local-2", marks=CPU),
    *(pytest.param("local", w, "cuda", False, id=f"local-cuda-{w}", marks=pytest.mark.gpu) for w in (2, 4, 8)),
    pytest.param("local", 4, "cuda", True, id="graph-safe-local-cuda-4", marks=pytest.mark.gpu),
    pytest.param("symmetric", 2, "cuda", False, id="cuda-ipc-2", marks=pytest.mark.gpu),
])  # fmt: skip
def test_two_shot_all_reduce_gives_one_shots_bits_on_every_rank(transport, world_size, device, graph_safe, seed):
    assert spawn(two_shot, world_size, transport, timeout=DEADLINE, device=device, args=(seed, graph_safe)) == [True] * world_size


def bad_operands_are_refused_before_the_call_starts(group, seed):
    """Refused before the epoch advances: a call refused after it would leave the ranks out of step
    for good. The same operators then give right results."""
    w, r, m = group.world_size, group.rank, group.world_size * ROWS
    x = [base_rand(seed + q, (ROWS, K)).to(group.device) for q in range(w)]
    xk = [base_rand(seed + 10 + q, (m, K)).to(group.device) for q in range(w)]
    wk = [base_rand(seed + 20 + q, (N, K)).to(group.device) for q in range(w)]
    with (
        FusedAllGatherMatmul(group, ROWS, K, torch.float32) as ag,
        FusedMatmulReduceScatter(group, ROWS, N, torch.float32) as rs,
        FusedMatmulAllReduceTwoShot(group, m, N, torch.float32) as two,
        FusedAllReduceResidualNorm(group, ROWS, N, torch.float32) as norm,
    ):
        res = torch.zeros(ROWS, N, device=group.device)
        refused = [
            (lambda: ag(x[r], [wk[r][:, :-1]]), f"AG+GEMM weights[0] must be float32[{N}, {K}] on cpu, got float32[{N}, {K - 1}] on cpu"),
            (lambda: ag(x[r].double(), [wk[r]]), f"AG+GEMM x_shard_m must be float32[{ROWS}, {K}] on cpu, got float64[{ROWS}, {K}]"),
            (lambda: ag(x[r], []), "AG+GEMM needs at least one weight, got none"),
            (lambda: rs(xk[r], wk[r][:-1]), f"GEMM+RS weight must be float32[{N}, {K}] on cpu, got float32[{N - 1}, {K}]"),
            (lambda: two(xk[r], wk[r].to("meta")), f"GEMM+AR(two-shot) weight must be float32[{N}, {K}] on cpu, got float32[{N}, {K}] on meta"),
            (lambda: two(xk[r][:, 0], wk[r]), f"GEMM+AR(two-shot) x must be float32[{m}, 'K'] on cpu, got float32[{m}]"),
            (lambda: norm(res, torch.ones(N - 1, device=group.device), res), f"AR+norm weight must be float32[{N}] on cpu, got float32[{N - 1}]"),
        ]  # fmt: skip
        for call, message in refused:
            with pytest.raises(ValueError, match=re.escape(f"rank {r}: {message}")):
                call()
        assert [op.epoch for op in (ag, rs, two, norm)] == [0] * 4
        exact = sum(d64(xk[q]) @ d64(wk[q]).T for q in range(w))
        mag = sum(d64(xk[q]).abs() @ d64(wk[q]).abs().T for q in range(w))
        assert_within(two(xk[r], wk[r]).cpu(), exact, matmul_tolerance(mag, torch.float32, K, w + 1), "two-shot after refusals")
        rows = slice(r * ROWS, (r + 1) * ROWS)
        assert_within(rs(xk[r], wk[r]).cpu(), exact[rows], matmul_tolerance(mag[rows], torch.float32, K, w + 1), "RS after refusals")
        gathered = torch.cat([d64(t) for t in x])
        tol = matmul_tolerance(gathered.abs() @ d64(wk[0]).abs().T, torch.float32, K, 1)
        assert_within(ag(x[r], [wk[0]])[0].cpu(), gathered @ d64(wk[0]).T, tol, "AG after refusals")
    return True


@pytest.mark.interpreter
def test_bad_operands_are_refused_before_the_call_starts(seed):
    assert spawn(bad_operands_are_refused_before_the_call_starts, 2, "local", timeout=DEADLINE, device="cpu", args=(seed,)) == [True] * 2


@pytest.mark.parametrize("op,rows,chunks,name", [
    (FusedMatmulReduceScatter, 2**16, {}, "GEMM+RS"),  # a chunk per rank's block
    (FusedMatmulAllReduce, 2**17, {"chunks": 2}, "GEMM+AR"),
    (FusedMatmulAllReduceTwoShot, 2**17, {"chunks": 2}, "GEMM+AR(two-shot)"),
    (FusedMatmulGroupAllReduce, 2**17, {"chunks": 2}, "GEMM+AR(group)"),
])  # fmt: skip
def test_a_chunk_too_large_for_an_int32_counter_is_refused_when_made(op, rows, chunks, name):
    """Checked before any buffer is allocated: 2**16 rows x 2**15 columns is 2**31 outputs a call."""
    group = type("OneRank", (), {"rank": 0, "world_size": 1})()
    with pytest.raises(ValueError, match=re.escape(f"rank 0: {name}: a chunk of 65536 rows x 32768 columns is more outputs than an int32")):
        op(group, rows, 2**15, torch.bfloat16, **chunks)


@pytest.mark.parametrize("transport,world_size,device", [
    pytest.param("local", 2, "cpu", id="local-2", marks=CPU), pytest.param("symmetric", 2, "cpu", id="symmetric-2", marks=CPU),
    pytest.param("local", 4, "cuda", id="local-cuda-4", marks=pytest.mark.gpu),
    pytest.param("symmetric", 2, "cuda", id="cuda-ipc-2", marks=pytest.mark.gpu),
])  # fmt: skip
def test_graph_safe_epochs_read_on_the_device_give_the_same_results(transport, world_size, device, seed):
    """graph_safe: every flag value comes from the device epoch (one-thread kernels on a GPU)."""
    assert spawn(fused_matmuls, world_size, transport, timeout=DEADLINE, device=device, args=(seed, True)) == [True] * world_size


def replayed(group, seed):
    """One call of each fused operator captured in one CUDA graph, replayed with its inputs mutated in
    place, against float64; eager calls before and after the replays agree with it."""
    w, r, dev, rows = group.world_size, group.rank, group.device, 16
    shapes = {"x_ag": (rows, K), "w_ag": (N, K), "x": (w * rows, K), "w": (N, K), "residual": (rows, N), "norm_w": (N,), "partial": (rows, N)}
    def data(e, q):  # call e's inputs of rank q, reproducible on every rank
        return {name: base_rand(seed + 1000 * e + 100 * q + i, shape) for i, (name, shape) in enumerate(shapes.items())}
    static = {name: t.to(dev) for name, t in data(0, r).items()}

    def verify(outs, e, when):
        d = [{name: t.to(torch.float64) for name, t in data(e, q).items()} for q in range(w)]
        y_ag, y_rs, y_ar, y_ar2, (normed, h) = outs
        x_all = torch.cat([dq["x_ag"] for dq in d])
        assert_within(y_ag.cpu(), x_all @ d[r]["w_ag"].T, matmul_tolerance(x_all.abs() @ d[r]["w_ag"].abs().T, torch.float32, K, 1), when)
        exact = sum(dq["x"] @ dq["w"].T for dq in d)
        mag = sum(dq["x"].abs() @ dq["w"].abs().T for dq in d)
        mine = slice(r * rows, (r + 1) * rows)
        assert_within(y_rs.cpu(), exact[mine], matmul_tolerance(mag[mine], torch.float32, K, w + 1), when)
        assert_within(y_ar.cpu(), exact, matmul_tolerance(mag, torch.float32, K, w + 1), when)
        assert torch.equal(y_ar2, y_ar), f"{when}: two-shot differs from one-shot"
        h64 = d[r]["residual"] + sum(dq["partial"] for dq in d)
        assert_within(h.cpu(), h64, 4 * w * torch.finfo(torch.float32).eps * (d[r]["residual"].abs() + sum(dq["partial"].abs() for dq in d)), when)
        ref = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5) * d[r]["norm_w"]
        assert (normed.cpu().double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item(), when

    ag, rs = workspace(group, "ag_gemm", rows, K, torch.float32), workspace(group, "gemm_rs", rows, N, torch.float32)
    ar = workspace(group, "gemm_ar", w * rows, N, torch.float32, 3)  # as the layers make them
    ar2 = workspace(group, "gemm_ar", w * rows, N, torch.float32, 3, shots=2)
    with FusedAllReduceResidualNorm(group, rows, N, torch.float32) as norm:
        def step():
            s = static
            return (ag(s["x_ag"], [s["w_ag"]])[0], rs(s["x"], s["w"]), ar(s["x"], s["w"]), ar2(s["x"], s["w"]),
                    norm(s["residual"], s["norm_w"], s["partial"]))  # fmt: skip

        verify(step(), 0, "eager, before capture")  # also tunes the GEMMs: tuning cannot be captured
        graph = torch.cuda.CUDAGraph()
        for turn in range(w):  # rank threads take turns: one capture at a time in a process
            if turn == r:
                with torch.cuda.graph(graph, stream=new_stream(dev), capture_error_mode="thread_local"):
                    outs = step()
            group.barrier()  # no replay before every rank has captured: a capture synchronises the device
        assert all(op.graph_safe for op in (ag, rs, ar, ar2, norm))
        for e in range(1, 4):
            for name, t in data(e, r).items():
                static[name].copy_(t)
            graph.replay()
            check_workspaces(group)
            norm.check()
            verify(outs, e, f"replay {e}")
        for name, t in data(4, r).items():
            static[name].copy_(t)
        verify(step(), 4, "eager, after the replays")
        assert [op.epoch_now.item() for op in (ag, rs, ar, ar2, norm)] == [5] * 5  # 1 eager + 3 replays + 1 eager
    close_workspaces(group)
    return True


def refuses_bad_wait_timeouts(group):
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"a wait's timeout must be a positive number of seconds, got {bad}"):
            FusedMatmulReduceScatter(group, ROWS, N, torch.float32, wait_timeout=bad)
    return FusedMatmulReduceScatter(group, ROWS, N, torch.float32, wait_timeout=float("inf")).wait_timeout


@CPU
def test_a_wait_timeout_that_is_not_a_positive_time_is_refused_when_the_operator_is_made():
    assert spawn(refuses_bad_wait_timeouts, 2, "local", timeout=DEADLINE) == [float("inf")] * 2


def failure_agreed(group, observed):
    """Rank 1's GEMM records a wait that gave up (as the kernel writes it): every rank learns that
    one did, in one collective, and only rank 1 names what it waited for."""
    op = workspace(group, "gemm_rs", ROWS, N, torch.float32)
    before = agreed_failure(group)
    if group.rank == 1:
        op.status.copy_(torch.tensor([1, 0, 7, observed], dtype=torch.int32))  # GEMM_WAIT_FAILED on chunk 0
    after = agreed_failure(group)
    close_workspaces(group)
    return before, after


@CPU
def test_a_fused_failure_on_one_rank_is_learned_by_every_rank(seed):
    results = spawn(failure_agreed, 3, "local", timeout=DEADLINE, args=(seed % 1000,))
    own = f"rank 1: GEMM+RS: the GEMM's wait on chunk 0 timed out: expected flag >= 7, observed {seed % 1000}"
    assert results == [(None, f"rank {r}: a fused operator's wait failed on rank(s) [1]") if r != 1 else (None, own) for r in range(3)]


def close_right_after(group):
    """No host sync between the last call and close(): close must not free memory still in use."""
    for _ in range(3):
        op = FusedMatmulReduceScatter(group, ROWS, N, torch.float32, check=False)
        out = op(torch.randn(group.world_size * ROWS, K, device="cuda"), torch.randn(N, K, device="cuda"))
        op.close()
    return bool(torch.isfinite(out).all())


@pytest.mark.gpu
def test_closing_right_after_a_call_is_safe():
    assert spawn(close_right_after, 4, "local", device="cuda", timeout=DEADLINE) == [True] * 4


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["local", "symmetric"])
def test_fused_ops_captured_in_a_cuda_graph_replay_with_fresh_inputs(transport, seed):
    assert spawn(replayed, 2, transport, device="cuda", timeout=1.5 * DEADLINE, args=(seed,)) == [True, True]


def fused_norm(group, seed, graph_safe):
    w, r, hidden = group.world_size, group.rank, 48
    outs = []
    with FusedAllReduceResidualNorm(group, 3, hidden, torch.float32, graph_safe=graph_safe) as op:
        for e in range(EPOCHS):
            parts = [rand(seed + 10 * e + q, (3, hidden)) for q in range(w)]
            residual, weight = rand(seed + 99 * e, (3, hidden)), rand(seed + 98 * e, (hidden,)).abs() + 0.5
            out, h = (t.cpu() for t in op(*(t.to(group.device) for t in (residual, weight, parts[r]))))
            h64 = d64(residual) + sum(d64(p) for p in parts)
            ref = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5) * d64(weight)
            assert_within(h, h64, 4 * w * torch.finfo(torch.float32).eps * (d64(residual).abs() + sum(d64(p).abs() for p in parts)), "h")
            assert (d64(out) - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
            outs.append((out.clone(), h.clone()))
    return outs


@pytest.mark.parametrize("transport,world_size,device,graph_safe", [
    pytest.param("local", 3, "cpu", False, marks=CPU), pytest.param("local", 8, "cpu", False, marks=CPU),
    pytest.param("symmetric", 2, "cpu", False, marks=CPU),
    pytest.param("local", 2, "cpu", True, marks=CPU), pytest.param("local", 4, "cuda", False, marks=pytest.mark.gpu),
    pytest.param("local", 2, "cuda", True, marks=pytest.mark.gpu), pytest.param("symmetric", 2, "cuda", False, marks=pytest.mark.gpu),
])  # fmt: skip
def test_fused_all_reduce_residual_norm_gives_every_rank_the_same_bits(transport, world_size, device, graph_safe, seed):
    per_rank = spawn(fused_norm, world_size, transport, timeout=DEADLINE, device=device, args=(seed, graph_safe))
    for outs in per_rank[1:]:
        assert all(torch.equal(a, b) and torch.equal(ha, hb) for (a, ha), (b, hb) in zip(outs, per_rank[0]))


def bf16_norm(group, seed):
    """bf16 on a GPU: the new residual is the fp32 sum in rank order, rounded once; the output is
    what an RMSNorm module computes from it, rounding where Hugging Face's does."""
    w, hidden, rows = group.world_size, 4096, 4
    parts = [rand(seed + q, (rows, hidden)).cuda().bfloat16() for q in range(w)]
    residual, weight = (3 * rand(seed + 50, (rows, hidden))).cuda().bfloat16(), rand(seed + 51, (hidden,)).cuda().bfloat16()
    with FusedAllReduceResidualNorm(group, rows, hidden, torch.bfloat16, 1e-6) as op:
        out, h = op(residual, weight, parts[group.rank])
    acc = parts[0].float()
    for p in parts[1:]:
        acc = acc + p.float()
    assert torch.equal(h, (acc + residual.float()).bfloat16())
    h32 = h.float()
    expected = weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    diff, ulp = (out.float() - expected.float()).abs(), expected.float().abs() * 2.0**-7
    assert bool((diff <= ulp).all()) and (diff == 0).float().mean().item() > 0.99
    return True


@pytest.mark.gpu  # the Triton interpreter truncates fp32 -> bf16 where a GPU rounds to nearest
def test_fused_residual_norm_rounds_bf16_as_the_unfused_norm_does(seed):
    assert spawn(bf16_norm, 2, "local", device="cuda", timeout=DEADLINE, args=(seed,)) == [True, True]


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=CPU), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_epoch_flag_kernels_write_and_wait_at_the_device_epoch(device, seed):
    g = torch.Generator().manual_seed(seed)
    epoch_value, scale, offset = (torch.randint(1, 1000, (3,), generator=g) - torch.tensor([0, 0, 500])).tolist()
    epoch = torch.tensor([epoch_value], dtype=torch.int32, device=device)
    flags, status = torch.zeros(3, dtype=torch.int32, device=device), torch.zeros(4, dtype=torch.int32, device=device)
    value = EpochValue(epoch, scale, offset)
    epoch_flags.write(flags, 1, value, status)
    assert flags.tolist() == [0, epoch_value * scale + offset, 0]
    epoch_flags.wait(flags, 1, value, status, wait_id=7, timeout=0.005)
    assert status.tolist() == [0, 0, 0, 0]
    epoch.fill_(2**31 - 1)  # the next epoch wraps to -2**31, which is still >= 2**31 - 1 as flags compare
    epoch_flags.write(flags, 0, EpochValue(epoch, 1, 1), status)
    epoch_flags.wait(flags, 0, EpochValue(epoch), status, wait_id=1, timeout=0.005)
    assert flags[0].item() == -(2**31) and status.tolist() == [0, 0, 0, 0]
    epoch.fill_(epoch_value)
    epoch_flags.wait(flags, 2, EpochValue(epoch), status, wait_id=9, timeout=0.005)  # flag 2 is 0 < epoch: gives up
    assert status.tolist() == [2, 9, epoch_value, 0]
    epoch_flags.wait(flags, 1, value, status, wait_id=4, timeout=0.005)  # reached, and the first failure stays
    epoch_flags.write(flags, 2, EpochValue(epoch), status)  # a failed operator publishes nothing more
    assert status.tolist() == [2, 9, epoch_value, 0] and flags[2].item() == 0


def back_to_back(group, seed, kind):
    """Calls with nothing between them and a slow reader: rank 0's pulls each start 50 ms late, so a
    peer's next GEMM would overwrite the partial rank 0 is still reading, unless it waited for rank
    0's DONE of the call before."""
    w, r, m = group.world_size, group.rank, group.world_size * ROWS
    calls = [[(base_rand(seed + 300 * e + q, (m, K)) * (q + 1), base_rand(seed + 500 * e + q, (N, K))) for q in range(w)]
             for e in range(EPOCHS)]  # fmt: skip
    with kind(group, m, N, torch.float32, 3) as op:
        if r == 0:
            move = op.lane.move
            op.lane.move = lambda chunks: (time.sleep(0.05), move(chunks))
        ys = [op(*inputs[r]) for inputs in calls]
    for e, (inputs, y) in enumerate(zip(calls, ys)):
        exact = sum(d64(x) @ d64(wt).T for x, wt in inputs)
        assert_within(y, exact, matmul_tolerance(sum(d64(x).abs() @ d64(wt).abs().T for x, wt in inputs), torch.float32, K, w + 1),
                      f"{op.name} call {e}, rank {r}")  # fmt: skip
    return True


@CPU
@pytest.mark.parametrize("kind", [FusedMatmulAllReduce, FusedMatmulAllReduceTwoShot], ids=["one-shot", "two-shot"])
def test_a_rank_does_not_overwrite_what_a_slow_peer_still_reads(kind, seed):
    assert spawn(back_to_back, 3, "local", timeout=DEADLINE, args=(seed, kind)) == [True] * 3


def late_peer(group, pattern, delay, wait_timeout=0.15):
    """Rank 1 sets the workspace up, then calls ``delay`` seconds late (or never: None): rank 0 must
    give up, naming what it waited on."""
    w = group.world_size
    make = {"ag": lambda: FusedAllGatherMatmul(group, ROWS, K, torch.float32, wait_timeout=wait_timeout),
            "rs": lambda: FusedMatmulReduceScatter(group, ROWS, N, torch.float32)}[pattern]  # fmt: skip
    op = make()
    call = {"ag": lambda: op(rand(0, (ROWS, K)), [rand(1, (N, K))]), "rs": lambda: op(rand(0, (w * ROWS, K)), rand(1, (N, K)))}
    if group.rank == 1:
        time.sleep(3 * group.timeout if delay is None else delay)
        if delay is not None:
            call[pattern]()
        return None
    start = time.monotonic()
    try:
        call[pattern]()
    except TimeoutError as error:
        return time.monotonic() - start, str(error)
    finally:
        op.buffer.abandon()
    return "no error"


@pytest.mark.parametrize("pattern,delay,wait_timeout,message", [
    ("ag", None, 0.15, r"AG\+GEMM rank 0: rank 1's rows: flag 1 did not reach 1 within [\d.]+ s \(observed 0\)"),
    ("ag", 1.0, 0.15, r"rank 0: AG\+GEMM: the GEMM's wait on chunk 1 timed out: expected flag >= 1, observed 0"),
    # the GEMM's wait timeout is minutes: it stops when the lane's wait gives up at the deadline
    ("ag", None, 600.0, r"AG\+GEMM rank 0: rank 1's rows: flag 1 did not reach 1 within [\d.]+ s \(observed 0\)"),
    ("rs", None, 0.15, r"GEMM\+RS rank 0: rank 1's tiles of chunk 0: flag 0 did not reach \d+ within [\d.]+ s \(observed 0\)"),
], ids=["ag-silent", "ag-late-gemm-wait-timeout", "ag-silent-gemm-stopped-at-the-deadline", "rs-silent"])  # fmt: skip
@CPU  # on a GPU an eager stream wait has no bound: a silent peer leaves the lane's stream blocked
def test_a_silent_or_late_peer_is_named_not_waited_for_forever(pattern, delay, wait_timeout, message):
    elapsed, text = spawn(late_peer, 2, "local", timeout=2.0, deadline=60, args=(pattern, delay, wait_timeout))[0]
    assert re.search(message, text), text
    assert elapsed < 30


def failed_peer(group, pattern, seen):
    """Rank 1 sets the workspace up, then raises instead of calling: rank 0's call gives up once it
    learns so, naming rank 1's error, not at the group's deadline."""
    w = group.world_size
    op = {"ag": lambda: FusedAllGatherMatmul(group, ROWS, K, torch.float32),
          "rs": lambda: FusedMatmulReduceScatter(group, ROWS, N, torch.float32)}[pattern]()  # fmt: skip
    if group.rank == 1:
        raise ValueError("rank 1's own failure")
    start = time.monotonic()
    try:
        op(rand(0, (ROWS, K)), [rand(1, (N, K))]) if pattern == "ag" else op(rand(0, (w * ROWS, K)), rand(1, (N, K)))
    except TimeoutError as error:
        seen.append((time.monotonic() - start, str(error)))
    finally:
        op.buffer.abandon()


@CPU
@pytest.mark.parametrize("pattern", ["ag", "rs"])
def test_a_failed_peer_thread_stops_the_wait_for_its_flags(pattern):
    seen = []
    with pytest.raises(ValueError, match="rank 1's own failure"):
        spawn(failed_peer, 2, "local", timeout=120, deadline=60, args=(pattern, seen))
    (elapsed, text), = seen
    assert re.search(r"flag \d+ gave up waiting for \d+ \(observed 0\): rank 1 failed with ValueError: rank 1's own failure", text), text
    assert elapsed < 20, elapsed  # the interpreted GEMM stops on the lane's ABORTED; the deadline is 120 s


def unchecked_late_peer(group, via_check):
    """check=False on a GPU: rank 0's call returns at once, its streams waiting on rank 1, which
    calls only after the deadline. The watchdog names what rank 0 waits on (or, ``via_check``,
    check() does, at its own deadline if first: it must not block behind the stream waits); rank
    1's call releases rank 0's streams; rank 0's operator stays failed."""
    w = group.world_size
    x, weight = rand(group.rank, (w * ROWS, K)).cuda(), rand(9, (N, K)).cuda()
    with FusedMatmulReduceScatter(group, ROWS, N, torch.float32, check=False) as warm:
        warm(x, weight)  # tunes and compiles, which may take longer than the deadline: on another operator
        torch.cuda.current_stream().synchronize()
    op = FusedMatmulReduceScatter(group, ROWS, N, torch.float32, check=False)
    op(x, weight)  # together, then meet at a barrier
    torch.cuda.current_stream().synchronize()
    group.barrier()
    if group.rank == 1:
        time.sleep(group.timeout + 3)
        op(x, weight)
        drain_within(group.device, 30, "rank 1's late call")
        return None
    start = time.monotonic()
    op(x, weight)
    returned = time.monotonic() - start
    if via_check:  # what check() raised: its own record, or the watchdog's (which it may complete after)
        with pytest.raises(TimeoutError) as checked:
            op.check()
        assert op.late.startswith(str(checked.value).removesuffix(" (a call made with check=False, reported by the watchdog)"))
    while (op.late is None or "; behind:" not in op.late) and time.monotonic() - start < 30:  # recorded, then completed
        time.sleep(0.05)
    reported, late = time.monotonic() - start, op.late
    drain_within(group.device, 30, "rank 0's call, released by rank 1's late one")
    with pytest.raises(TimeoutError) as raised:
        op(x, weight)
    return returned, reported, late, str(raised.value)


@pytest.mark.gpu
@pytest.mark.parametrize("via_check", [False, True], ids=["watchdog", "check"])
def test_an_unchecked_call_whose_peer_is_late_is_named_by_the_watchdog_or_check(via_check):
    returned, reported, late, raised = spawn(unchecked_late_peer, 2, "local", device="cuda", timeout=2.0, args=(via_check,))[0]
    assert returned < 1.0 and 2.0 <= reported < 10
    assert re.search(r"rank 0: GEMM\+RS epoch 2 did not finish within 2(\.0)? s; behind: rank 1 flag 0 is \d+, needs \d+", late), late
    assert raised == late
    if not via_check:
        assert late.endswith("(a call made with check=False, reported by the watchdog)")


def reported_late(group):
    with FusedMatmulReduceScatter(group, ROWS, N, torch.float32, check=False) as op:
        x, weight = rand(0, (ROWS, K)), rand(1, (N, K))
        op(x, weight)
        # what a call past its deadline waits for: a flag behind (it may be blocked), or nothing (slow: not recorded)
        text, blocked = op._behind([(0, 0, 1)], 0)
        assert not blocked and text.endswith("behind: nothing this rank can see (the GPU is slow)")
        text, blocked = op._behind([(0, 0, 1)], 10**6)
        assert blocked and re.search(r"behind: rank 0 flag 0 is \d+, needs 1000000$", text), text
        # what the watchdog calls past a deadline: this call just finished, so nothing is reported
        assert op._report_late([(0, 0, 1)], 10**6, done=lambda: True) is False and op.late is None
        assert op._report_late([(0, 0, 1)], 10**6, done=lambda: False) is True  # this one is still running
        first = op.late
        assert op._report_late([(0, 0, 1)], 7, done=lambda: False) is True  # later late calls wait behind the first
        assert op.late == first
        for call in (lambda: op(x, weight), op.check):
            with pytest.raises(TimeoutError) as raised:
                call()
            assert str(raised.value) == first
        return first


@CPU
def test_a_late_call_stays_recorded_and_every_later_call_raises_it():
    text = spawn(reported_late, 1, "local", timeout=5.0)[0]
    assert re.fullmatch(r"rank 0: GEMM\+RS epoch 1000000 did not finish within 5(\.0)? s; behind: rank 0 flag 0 is \d+, needs 1000000 "
                        r"\(a call made with check=False, reported by the watchdog\)", text), text


def test_fused_says_why_it_cannot_run_or_be_timed():
    class FakeDist:  # what fused_unavailable reads off a DistGroup, on the device Triton runs on here
        world_size, rank, device = 4, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")

        def memory_not_shared(self):
            return "the ranks run on 2 hosts"

    class CpuDist(FakeDist):
        device = torch.device("cpu")

    if INTERPRETING:
        assert "under the Triton interpreter a timing measures Python" in fused_unavailable(FakeDist(), "gemm_ar", timing=True)
    else:
        assert fused_unavailable(FakeDist(), "gemm_ar", timing=True) is None
        assert "the group's tensors are on cpu: Triton runs kernels on a CUDA GPU (TRITON_INTERPRET=1" in fused_unavailable(CpuDist(), "gemm_ar")
    for pattern in ("ag_gemm", "gemm_rs"):
        expected = f"fused {pattern} needs memory shared by every rank: the ranks run on 2 hosts"
        assert fused_unavailable(FakeDist(), pattern) == expected
    assert fused_unavailable(FakeDist(), "gemm_ar") is None  # the group's own all-reduce per chunk


def sharing(group, local_world_sizes, host_names):
    """A DistGroup made with these ``LOCAL_WORLD_SIZE`` values and host identities, one per rank."""
    from interlace.engine.comm import dist_group
    from interlace.engine.overlap.dispatch import topology

    os.environ.pop("LOCAL_WORLD_SIZE", None)
    if local_world_sizes[group.rank] is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_sizes[group.rank])
    if host_names is not None:
        dist_group.host_identity = lambda: host_names[group.rank]
    made = dist_group.DistGroup(group.pg)
    try:
        return made.memory_not_shared(), made.hosts, topology(made)
    finally:
        made.close()


@pytest.mark.parametrize("local,hosts,expected", [
    ((None, None), None, "LOCAL_WORLD_SIZE is unset on rank(s) [0, 1] (torchrun sets it): ranks may span hosts"),
    ((2, None), None, "LOCAL_WORLD_SIZE is unset on rank(s) [1] (torchrun sets it): ranks may span hosts"),  # agreed, not rank 0's alone
    ((2, 2), ("a", "b"), "the ranks run on 2 hosts"),
    ((4, 4), None, None),  # a group of 2 of a host's 4 processes
])  # fmt: skip
def test_a_dist_group_agrees_whether_its_ranks_share_memory(local, hosts, expected):
    results = spawn(sharing, 2, "gloo", args=(local, hosts), timeout=60)
    suffix = "/2hosts" if hosts else ""
    assert results == [(expected, 2 if hosts else 1, f"cpu{os.cpu_count()}{suffix}")] * 2


NOT_INTERPRETED = """
import torch
from interlace.engine.comm import spawn
from interlace.engine.overlap.fused import FusedMatmulAllReduce
from interlace.ops.gemm import gemm

for call in (lambda: gemm(torch.ones(4, 8), torch.ones(8, 8)),
             lambda: spawn(lambda group: FusedMatmulAllReduce(group, 4, 8, torch.float32), 2, "local")):
    try:
        call()
    except (ValueError, RuntimeError) as error:
        print(type(error).__name__, error)
"""


def test_kernels_asked_to_run_on_cpu_tensors_without_the_interpreter_say_so():
    """Refused up front, naming the way out; Triton's own error comes from deep inside the tuning
    ("Expected a cuda device, but got: cpu")."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", NOT_INTERPRETED], env=env, capture_output=True, text=True, timeout=120)
    why = r"Triton runs kernels on a CUDA GPU \(TRITON_INTERPRET=1, set before Triton is imported, runs them on CPU, for tests\)"
    assert re.fullmatch(rf"ValueError gemm: x is on cpu: {why}\nRuntimeError rank [01]: GEMM\+AR: the group's tensors are on cpu: {why}\n",
                        done.stdout), (
        done.stdout + done.stderr)


def group_all_reduce(group, seed, graph_safe=False):
    """GEMM+AR over the group's own all-reduce, several epochs, against float64; its counters exactly."""
    w, m, chunks = group.world_size, 3 * ROWS + 5, 3  # a short last chunk

    def rand(s, shape):
        return base_rand(s, shape).to(group.device)

    with FusedMatmulGroupAllReduce(group, m, N, torch.float32, chunks, graph_safe=graph_safe) as ar:
        assert ar.buffer is None and ar.chunks == chunks
        for e in range(1, EPOCHS + 1):
            xk = [rand(seed + 300 * e + q, (m, K)) * (q + 1) for q in range(w)]
            wk = [rand(seed + 500 * e + q, (N, K)) for q in range(w)]
            exact = sum(d64(xk[q]) @ d64(wk[q]).T for q in range(w))
            mag = sum(d64(xk[q]).abs() @ d64(wk[q]).abs().T for q in range(w))
            y = ar(xk[group.rank], wk[group.rank])
            assert_within(y.cpu(), exact, matmul_tolerance(mag, torch.float32, K, w + 1), f"AR(group) e{e}")
            step = -(-m // chunks)
            assert ar.own_flags.tolist() == [e * min(step, m - c * step) * N for c in range(chunks)]
    return True


@pytest.mark.parametrize("transport,world_size,device", [
    pytest.param("local", 1, "cpu", id="local-1", marks=CPU), pytest.param("local", 3, "cpu", id="local-3", marks=CPU),
    pytest.param("gloo", 2, "cpu", id="gloo-2", marks=CPU),
    pytest.param("local", 4, "cuda", id="local-cuda-4", marks=pytest.mark.gpu),
    pytest.param("nccl", 2, "cuda", id="nccl-2", marks=pytest.mark.gpu),
])  # fmt: skip
def test_fused_all_reduce_over_the_groups_own_all_reduce(transport, world_size, device, seed):
    """For ranks that share no memory: one GEMM, each row chunk all-reduced once this rank has it."""
    assert spawn(group_all_reduce, world_size, transport, timeout=DEADLINE, device=device, args=(seed,)) == [True] * world_size


def fused_across_nodes(group, seed):
    """A DistGroup that may span nodes: fused GEMM+AR runs over its all-reduce; AG and RS say why not."""
    from interlace import OverlapConfig
    from interlace.engine.overlap.collective_matmul import all_gather_matmul, matmul_all_reduce

    fused, w = OverlapConfig(strategy="fused", chunks=2), group.world_size
    x = [base_rand(seed + q, (2 * ROWS, K)) for q in range(w)]
    weight = [base_rand(seed + 50 + q, (N, K)) for q in range(w)]
    y = matmul_all_reduce(x[group.rank], weight[group.rank], group, fused)
    exact = sum(d64(x[q]) @ d64(weight[q]).T for q in range(w))
    assert_within(y, exact, matmul_tolerance(sum(d64(x[q]).abs() @ d64(weight[q]).abs().T for q in range(w)), torch.float32, K, w + 1), "AR across nodes")
    assert isinstance(workspace(group, "gemm_ar", 2 * ROWS, N, torch.float32, 2), FusedMatmulGroupAllReduce)
    with pytest.raises(RuntimeError, match=r"rank \d: overlap='fused' cannot run here: fused ag_gemm needs memory shared"):
        all_gather_matmul(x[group.rank], weight, group, fused)
    with pytest.raises(RuntimeError, match=r"rank \d: overlap='fused' cannot run here: two-shot fused gemm_ar needs memory shared "
                       r"by every rank: LOCAL_WORLD_SIZE is unset on rank\(s\) \[0, 1\] .*whose algorithm the transport picks \(use shots=1\)"):
        matmul_all_reduce(x[group.rank], weight[group.rank], group, dataclasses.replace(fused, shots=2))
    close_workspaces(group)
    return True


@CPU
def test_fused_across_nodes_runs_gemm_ar_over_the_group_and_says_why_not_the_others(seed):
    assert spawn(fused_across_nodes, 2, "gloo", timeout=DEADLINE, args=(seed,)) == [True, True]
