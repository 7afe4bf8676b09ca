"""Tensor-parallel layers against their unsharded nn.Linear / nn.Embedding, forward and backward.

World sizes 1, 2 and 4 on LocalGroup (and 2 on gloo), bulk and chunked; fused under the Triton
interpreter; on a GPU every strategy on LocalGroup 2 and 4, and fused over CUDA IPC. Exact where no
cross-rank reduction happens and no GEMM is re-shaped (embedding lookups). GEMM outputs of a
shard are NOT bit-identical to the matching slice of the unsharded GEMM in fp32 (measured: CPU BLAS
takes another kernel for a 32-column shard at K=1000, up to 2.7e-5 apart), so they are held to the
GEMM error bound of reference.matmul_tolerance against float64; reductions add their roundings.
"""

import time

import pytest
import torch
import torch.nn.functional as F

from interlace.engine.comm import spawn
from interlace.engine.overlap import OverlapConfig
from interlace.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from interlace.layers.linear import ColumnParallelLinear, RowParallelLinear
from interlace.layers.mlp import ParallelMLP
from reference import assert_no_worse, assert_within, make_linear, matmul_tolerance, rand

K, N = 24, 16  # divisible by every world size tested
TRANSPORTS = [pytest.param("local", w, id=f"local-{w}") for w in (1, 2, 4)] + [pytest.param("gloo", 2, id="gloo-2")]
STRATEGIES = ["bulk", "chunked"]


def config(strategy):
    if strategy == "fused-two-shot":
        return OverlapConfig(strategy="fused", chunks=2, shots=2)
    return OverlapConfig(strategy=strategy, chunks=2)


def d64(t):
    return t.detach().to("cpu", torch.float64)


def column_body(group, seed, sequence_parallel, strategy, dtype_name, backward=True):
    dtype, w, r = getattr(torch, dtype_name), group.world_size, group.rank
    ref = make_linear(seed, K, N, True, dtype)
    m = 3
    x, grad_y = rand(seed + 1, (m * w, K), dtype), rand(seed + 2, (m * w, N), dtype)
    layer = ColumnParallelLinear.from_linear(ref.to(group.device), group, sequence_parallel=sequence_parallel, overlap=config(strategy))
    x_in = (x[r * m : (r + 1) * m] if sequence_parallel else x).to(group.device, copy=True).requires_grad_()
    y = layer(x_in)
    n = N // w
    cols = slice(r * n, (r + 1) * n)
    exact = d64(x) @ d64(ref.weight).T + d64(ref.bias)
    magnitude = d64(x).abs() @ d64(ref.weight).abs().T + d64(ref.bias).abs()
    assert_within(y, exact[:, cols], matmul_tolerance(magnitude[:, cols], dtype, K, 2), f"rank {r} column forward")
    if not backward:
        return True
    (y * grad_y[:, cols].to(y.device)).sum().backward()
    gx = d64(grad_y) @ d64(ref.weight)
    gx_mag = d64(grad_y).abs() @ d64(ref.weight).abs()
    rows = slice(r * m, (r + 1) * m) if sequence_parallel else slice(None)
    assert_within(x_in.grad, gx[rows], matmul_tolerance(gx_mag[rows], dtype, N, w + 1), f"rank {r} column grad x")
    gw = d64(grad_y).T @ d64(x)
    assert_within(layer.weight.grad, gw[cols], matmul_tolerance((d64(grad_y).abs().T @ d64(x).abs())[cols], dtype, m * w, 1), f"rank {r} grad w")
    assert_within(layer.bias.grad, d64(grad_y).sum(0)[cols], matmul_tolerance(d64(grad_y).abs().sum(0)[cols], dtype, m * w, 1), f"rank {r} grad b")
    return True


def row_body(group, seed, sequence_parallel, strategy, dtype_name, backward=True):
    dtype, w, r = getattr(torch, dtype_name), group.world_size, group.rank
    ref = make_linear(seed, K, N, True, dtype)
    tokens = 3 * w + (1 if w > 1 else 0)  # with SP, not a multiple of W: exercises padding
    x, grad_y = rand(seed + 1, (tokens, K), dtype), rand(seed + 2, (tokens, N), dtype)
    k = K // w
    layer = RowParallelLinear.from_linear(ref.to(group.device), group, sequence_parallel=sequence_parallel, overlap=config(strategy))
    x_in = x[:, r * k : (r + 1) * k].to(group.device, copy=True).requires_grad_()
    y = layer(x_in)
    exact = d64(x) @ d64(ref.weight).T + d64(ref.bias)
    magnitude = d64(x).abs() @ d64(ref.weight).abs().T + d64(ref.bias).abs()
    if sequence_parallel:  # this rank's rows of the padded tokens; padding rows are bias only
        per = -(-tokens // w)
        rows = slice(r * per, min((r + 1) * per, tokens))
        real = rows.stop - rows.start
        assert y.shape == (per, N)
        y, exact, magnitude, grad_y = y[:real], exact[rows], magnitude[rows], grad_y[rows]
    assert_within(y, exact, matmul_tolerance(magnitude, dtype, K, w + 2), f"rank {r} row forward")
    if not backward:
        return True
    (y * grad_y.to(y.device)).sum().backward()
    grad_full = rand(seed + 2, (tokens, N), dtype)
    gx = (d64(grad_full) @ d64(ref.weight))[:, r * k : (r + 1) * k]
    gx_mag = (d64(grad_full).abs() @ d64(ref.weight).abs())[:, r * k : (r + 1) * k]
    assert_within(x_in.grad, gx, matmul_tolerance(gx_mag, dtype, N, 1), f"rank {r} row grad x")
    gw = (d64(grad_full).T @ d64(x))[:, r * k : (r + 1) * k]
    gw_mag = (d64(grad_full).abs().T @ d64(x).abs())[:, r * k : (r + 1) * k]
    assert_within(layer.weight.grad, gw, matmul_tolerance(gw_mag, dtype, tokens, 1), f"rank {r} row grad w")
    bias_grad = group.all_reduce(layer.bias.grad) if sequence_parallel else layer.bias.grad  # SP: per-token-shard partials
    assert_within(bias_grad, d64(grad_full).sum(0), matmul_tolerance(d64(grad_full).abs().sum(0), dtype, tokens, w + 1), f"rank {r} grad b")
    return True


@pytest.mark.interpreter
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("body", [column_body, row_body], ids=["column", "row"])
def test_fused_linear_layers_match_unsharded(body, sequence_parallel, world_size, seed):
    """The fused path (one Triton GEMM + symmetric memory + flags), forward and backward."""
    assert spawn(body, world_size, "local", timeout=60, args=(seed, sequence_parallel, "fused", "float32")) == [True] * world_size


@pytest.mark.parametrize("world_size,device", [pytest.param(w, "cpu", marks=pytest.mark.interpreter, id=f"local-{w}") for w in (2, 4)]
                         + [pytest.param(4, "cuda", marks=pytest.mark.gpu, id="local-cuda-4")])  # fmt: skip
def test_fused_two_shot_row_parallel_layer_matches_unsharded(world_size, device, seed):
    """A row-parallel layer's all-reduce fused two-shot, forward and (on the CPU) backward."""
    assert spawn(two_shot_row, world_size, "local", timeout=60, device=device, args=(seed,)) == [["FusedMatmulAllReduceTwoShot"]] * world_size


# One GPU: LocalGroup (a stream per rank, one process) for every strategy, forward only (it cannot
# run backward: see test_local_group_on_one_gpu_refuses_backward_at_once); CUDA IPC between
# processes for fused, the one strategy with a transport of its own (bulk and chunked over
# SymmetricGroup are its collectives, which tests/test_comm_conformance.py covers), and backward.
GPU_CASES = [pytest.param("local", w, s, id=f"local-cuda-{w}-{s}") for w in (2, 4) for s in ("bulk", "chunked", "fused")] + [
    pytest.param("symmetric", 2, "fused", id="cuda-ipc-2-fused")]


@pytest.mark.gpu
@pytest.mark.parametrize("transport,world_size,strategy", GPU_CASES)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("body", [column_body, row_body], ids=["column", "row"])
def test_linear_layers_on_one_gpu_match_unsharded(body, sequence_parallel, strategy, transport, world_size, seed):
    args = (body, seed, sequence_parallel, strategy, transport != "local")
    assert spawn(in_both_dtypes, world_size, transport, timeout=60, device="cuda", args=args) == [True] * world_size


def in_both_dtypes(group, body, seed, sequence_parallel, strategy, backward):
    """``body`` in bf16, then fp32, on one group: a world started per dtype would double the process starts."""
    return all([body(group, seed, sequence_parallel, strategy, dtype, backward) for dtype in ("bfloat16", "float32")])


def backward_on_one_gpu(group):
    """A column layer's backward all-reduces its input's gradient: on autograd's device thread."""
    layer = ColumnParallelLinear(K, N, group, device="cuda")
    y = layer(torch.randn(3, K, device="cuda", requires_grad=True))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"rank {group.rank}: all_reduce called on thread .*LocalGroup cannot run backward"):
        y.sum().backward()
    return time.monotonic() - start < group.timeout / 2


@pytest.mark.gpu
def test_local_group_on_one_gpu_refuses_backward_at_once():
    assert spawn(backward_on_one_gpu, 2, "local", timeout=60, device="cuda") == [True, True]


def two_shot_row(group, seed):
    """``row_body`` with two-shot; which fused operators it made."""
    assert row_body(group, seed, False, "fused-two-shot", "float32", group.device.type == "cpu")
    return [type(op).__name__ for op in group.__dict__["_fused_workspaces"].values()]


@pytest.mark.parametrize("transport,world_size", TRANSPORTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("body", [column_body, row_body], ids=["column", "row"])
def test_linear_layers_match_unsharded(body, sequence_parallel, strategy, transport, world_size, seed):
    dtypes = ["float32", "bfloat16"] if transport == "local" else ["float32"]
    for dtype in dtypes:
        assert spawn(body, world_size, transport, timeout=30, args=(seed, sequence_parallel, strategy, dtype)) == [True] * world_size


def embedding_body(group, seed):
    vocab, hidden = 32, 8
    g = torch.Generator().manual_seed(seed)
    ref = torch.nn.Embedding(vocab, hidden)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(vocab, hidden, generator=g))
    ids = torch.randint(0, vocab, (3, 5), generator=g)
    grad = torch.randn(3, 5, hidden, generator=g)
    layer = VocabParallelEmbedding.from_embedding(ref, group)
    out = layer(ids)
    assert torch.equal(out, ref(ids)), f"rank {group.rank}: embedding differs"  # one rank contributes each row: exact
    (out * grad).sum().backward()
    (ref(ids) * grad).sum().backward()
    rows = slice(layer.vocab_start, layer.vocab_start + layer.weight.shape[0])
    assert torch.equal(layer.weight.grad, ref.weight.grad[rows]), f"rank {group.rank}: embedding grad differs"
    return True


def lm_head_body(group, seed, strategy):
    ref = make_linear(seed, K, N, False, torch.float32)
    x, grad_y = rand(seed + 1, (2, 3, K)), rand(seed + 2, (2, 3, N))
    head = ParallelLMHead.from_linear(ref, group, overlap=config(strategy))
    x_in = x.clone().requires_grad_()
    logits = head(x_in)
    assert logits.shape == (2, 3, N)
    exact, magnitude = d64(x) @ d64(ref.weight).T, d64(x).abs() @ d64(ref.weight).abs().T
    assert_within(logits, exact, matmul_tolerance(magnitude, torch.float32, K, 1), f"rank {group.rank} logits")
    (logits * grad_y).sum().backward()
    gx, gx_mag = d64(grad_y) @ d64(ref.weight), d64(grad_y).abs() @ d64(ref.weight).abs()
    assert_within(x_in.grad, gx, matmul_tolerance(gx_mag, torch.float32, N, group.world_size + 1), f"rank {group.rank} head grad x")
    return True


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_vocab_parallel_embedding_is_exact(world_size, seed):
    assert spawn(embedding_body, world_size, "local", args=(seed,)) == [True] * world_size


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lm_head_gathers_full_logits(world_size, strategy, seed):
    assert spawn(lm_head_body, world_size, "local", args=(seed, strategy)) == [True] * world_size


class GatedMLP(torch.nn.Module):
    def __init__(self, seed, hidden, ffn):
        super().__init__()
        self.gate_proj = make_linear(seed, hidden, ffn, False, torch.float32)
        self.up_proj = make_linear(seed + 1, hidden, ffn, False, torch.float32)
        self.down_proj = make_linear(seed + 2, ffn, hidden, False, torch.float32)
        self.act_fn = F.silu

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def mlp_body(group, seed, sequence_parallel, strategy):
    w, r = group.world_size, group.rank
    ref = GatedMLP(seed, K, 2 * K)
    x = rand(seed + 5, (4 * w, K))
    mlp = ParallelMLP.from_mlp(ref, group, sequence_parallel=sequence_parallel, overlap=config(strategy))
    y = mlp(x[r * 4 : (r + 1) * 4] if sequence_parallel else x)
    unsharded = ref(x)
    exact = ref.double()(x.double())
    rows = slice(r * 4, (r + 1) * 4) if sequence_parallel else slice(None)
    assert_no_worse(y, unsharded[rows], exact[rows], f"rank {r} mlp")
    return True


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_parallel_mlp_matches_unsharded(sequence_parallel, strategy, world_size, seed):
    assert spawn(mlp_body, world_size, "local", args=(seed, sequence_parallel, strategy)) == [True] * world_size


def autocast_body(group, seed, kind, sequence_parallel, strategy):
    """float32 parameters under CPU autocast to bf16, as nn.Linear there: bf16 operands and output,
    float32 gradients."""
    w, r = group.world_size, group.rank
    ref = make_linear(seed, K, N, True, torch.float32)
    layer_type = ColumnParallelLinear if kind == "column" else RowParallelLinear
    layer = layer_type.from_linear(ref, group, sequence_parallel=sequence_parallel, overlap=config(strategy))
    x, m, n, k = rand(seed + 1, (3 * w, K)), 3, N // w, K // w
    mine = slice(r * m, (r + 1) * m) if sequence_parallel else slice(None)  # rows in (column) or out (row)
    x_in = x[mine] if kind == "column" else x[:, r * k : (r + 1) * k]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x_in.clone().requires_grad_())
        y_ref = ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16, (y.dtype, y_ref.dtype)
    bf16 = [d64(t.to(torch.bfloat16)) for t in (x, ref.weight, ref.bias)]
    exact, magnitude = bf16[0] @ bf16[1].T + bf16[2], bf16[0].abs() @ bf16[1].abs().T + bf16[2].abs()
    rows, cols = (slice(None), slice(r * n, (r + 1) * n)) if kind == "column" else (mine, slice(None))
    assert_within(y, exact[rows, cols], matmul_tolerance(magnitude[rows, cols], torch.bfloat16, K, w + 2), f"rank {r} {kind}")
    y.float().sum().backward()
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    return True


@pytest.mark.parametrize("strategy", ["bulk", "chunked", pytest.param("fused", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_linear_layers_under_autocast_multiply_as_nn_linear_does(kind, sequence_parallel, strategy, seed):
    assert spawn(autocast_body, 2, "local", timeout=60, args=(seed, kind, sequence_parallel, strategy)) == [True, True]
