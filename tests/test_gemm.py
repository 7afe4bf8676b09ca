"""The Triton GEMM and its overlap hooks, under TRITON_INTERPRET=1 on CPU (on the GPU with one).

Outputs are held to a float64 reference with the GEMM error bound of reference.matmul_tolerance,
widened by 1.13 (the largest slope of SiLU and GELU) for activations; bf16 and fp16 are upcast to
fp32 under the interpreter only (its bf16 arithmetic is wrong), never on a GPU.
"""

import dataclasses
import functools
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from interlace.engine.comm import signals
from interlace.engine.device import new_stream
from interlace.ops.gemm import SignalHook, WaitHook, chunk_outputs, gemm, interpreter_problem, needs_int64, plan_for
from reference import assert_within, matmul_tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1), (37, 41, 43), (5, 3, 45), (70, 50, 33), (64, 64, 64), (33, 97, 7)]


def operands(seed, m, n, k, dtype, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    if layout == "transposed":  # w handed over as the transpose of a [K, N] tensor
        w = w.t().contiguous().t()
    elif layout == "strided":
        x, w = spread(x), spread(w)
    return x, w


def spread(t):
    """The same values, as every other row and column of a larger tensor."""
    big = torch.zeros(2 * t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    big[::2, ::2] = t
    return big[::2, ::2]


def reference(x, w, bias=None, residual=None, activation=None):
    """(exact float64 result, elementwise magnitude bound before the activation)."""
    x64, w64 = x.double().cpu(), w.double().cpu()
    acc, mag = x64 @ w64.T, x64.abs() @ w64.abs().T
    if bias is not None:
        acc, mag = acc + bias.double().cpu(), mag + bias.double().cpu().abs()
    acc = {None: acc, "silu": F.silu(acc), "gelu": F.gelu(acc)}[activation]
    mag = mag * (1.13 if activation else 1.0)
    if residual is not None:
        acc, mag = acc + residual.double().cpu(), mag + residual.double().cpu().abs()
    return acc, mag


def assert_gemm_close(y, x, w, what, **epilogue):
    exact, magnitude = reference(x, w, **epilogue)
    assert_within(y.cpu(), exact, matmul_tolerance(magnitude, y.dtype, x.shape[1] + 8, 2), what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_shapes_and_dtypes(m, n, k, dtype, seed):
    x, w = operands(seed, m, n, k, dtype)
    assert_gemm_close(gemm(x, w), x, w, f"{m}x{n}x{k} {dtype}")


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_and_non_contiguous_inputs(layout, dtype, seed):
    x, w = operands(seed, 37, 41, 43, dtype, layout)
    assert not (x.is_contiguous() and w.is_contiguous())
    assert_gemm_close(gemm(x, w), x, w, f"{layout} {dtype}")


EPILOGUES = [dict(bias=True), dict(residual=True), dict(activation="silu"), dict(activation="gelu"),
             dict(bias=True, activation="silu", residual=True), dict(bias=True, activation="gelu")]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "+".join(f"{k}={v}" if k == "activation" else k for k, v in e.items()))
def test_epilogues(epilogue, dtype, seed):
    m, n, k = 37, 41, 43
    x, w = operands(seed, m, n, k, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    extra = {"activation": epilogue.get("activation")}
    if epilogue.get("bias"):
        extra["bias"] = torch.randn(n, generator=g).to(DEVICE, dtype)
    if epilogue.get("residual"):  # a transposed view: strided residuals are supported
        extra["residual"] = torch.randn(n, m, generator=g).to(DEVICE, dtype).t()
    assert_gemm_close(gemm(x, w, **extra), x, w, f"{epilogue} {dtype}", **extra)


def test_out_buffer_is_written_with_its_strides(seed):
    x, w = operands(seed, 20, 30, 40, torch.float32)
    out = torch.full((30, 20), float("nan"), device=DEVICE).t()
    assert gemm(x, w, out=out) is out
    assert_gemm_close(out, x, w, "strided out")


@pytest.mark.parametrize("shape,stride,wide", [
    ((2**16, 2**15), (2**15, 1), False),  # 2**31 elements: the last offset, 2**31 - 1, is an int32
    ((2**16 + 1, 2**15), (2**15, 1), True),
    ((4, 3), (1, 2**30), True),  # a transposed view: (rows-1)*1 + (cols-1)*2**30 = 2**31 + 3
    ((0, 2**40), (1, 1), False),  # empty: no element, no offset
])  # fmt: skip
def test_int64_offsets_exactly_when_an_offset_reaches_2_31(shape, stride, wide):
    assert needs_int64(torch.empty_strided(shape, stride, device="meta")) is wide


@pytest.mark.gpu
def test_operands_past_2_31_elements_multiply_right(seed):
    """x of 2**31 + 2**16 bf16 elements (4 GB): its last rows sit past int32 offsets."""
    m, n, k = 2**19 + 16, 16, 2**12
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, generator=g, device=DEVICE, dtype=torch.bfloat16) / k**0.5
    y = gemm(x, w)
    for rows in (slice(0, 64), slice(m - 64, m)):
        assert_gemm_close(y[rows], x[rows], w, f"rows {rows.start}..{rows.stop} of {m}")


def test_tolerance_can_fail(seed):
    """The bound catches the mistakes a GEMM kernel makes: in fp32 one element off by 1e-3, in bf16
    (a looser bound: |x|@|w| far exceeds |y| after cancellation) a dropped last K column, which is
    what a wrong ragged-edge mask does."""
    x, w = operands(seed, 37, 41, 43, torch.float32)
    wrong = gemm(x, w)
    wrong[3, 7] += 1e-3
    with pytest.raises(AssertionError, match="outside tolerance"):
        assert_gemm_close(wrong, x, w, "fp32, one element off by 1e-3")
    x, w = operands(seed, 37, 41, 43, torch.bfloat16)
    with pytest.raises(AssertionError, match="outside tolerance"):
        assert_gemm_close(gemm(x[:, :-1], w[:, :-1]), x, w, "bf16, last K column dropped")


# --- hooks ---------------------------------------------------------------------------------------


def expected_outputs_per_chunk(m, n, chunk_rows):
    """Counted independently of the wrapper: each output element of chunk c's rows, once."""
    rows = torch.arange(m) // chunk_rows
    return [int((rows == c).sum()) * n for c in range(-(-m // chunk_rows))]


@pytest.mark.parametrize("chunk_rows", [32, 20])  # 20: tiles straddle chunks and count for both
def test_signal_counters_are_exact_over_epochs(chunk_rows, seed):
    m, n, k = 100, 70, 33
    x, w = operands(seed, m, n, k, torch.float32)
    expected = expected_outputs_per_chunk(m, n, chunk_rows)
    assert chunk_outputs(m, n, chunk_rows) == expected
    counters = torch.zeros(len(expected), dtype=torch.int32, device=DEVICE)
    for epoch in (1, 2, 3):
        y = gemm(x, w, signal=SignalHook(counters, chunk_rows), start_chunk=epoch % len(expected))
        assert counters.tolist() == [epoch * t for t in expected]
        assert_gemm_close(y, x, w, f"signalled epoch {epoch}")


def test_signal_counters_do_not_depend_on_the_block_sizes(seed):
    """Ranks tuned apart (other block sizes) must still agree on what a finished chunk counts."""
    m, n, k, chunk_rows = 96, 40, 16, 24
    x, w = operands(seed, m, n, k, torch.float32)
    plan = plan_for(x, w)
    for block_m, block_n in ((plan.block_m, plan.block_n), (16, 32), (64, 16)):
        counters = torch.zeros(4, dtype=torch.int32, device=DEVICE)
        other = type(plan)(**{**plan.__dict__, "block_m": block_m, "block_n": block_n})
        gemm(x, w, signal=SignalHook(counters, chunk_rows), plan=other)
        assert counters.tolist() == expected_outputs_per_chunk(m, n, chunk_rows), (block_m, block_n)


def test_a_kept_status_that_records_a_failure_stops_the_signals(seed):
    """A broken operator must stop publishing, so that its peers time out instead of reading it."""
    m, n, k, chunk_rows = 64, 40, 16, 32
    x, w = operands(seed, m, n, k, torch.float32)
    counters = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    status = torch.tensor([2, 5, 9, 8], dtype=torch.int32, device=DEVICE)
    gemm(x, w, signal=SignalHook(counters, chunk_rows), status=status)
    assert counters.tolist() == [0, 0] and status.tolist() == [2, 5, 9, 8]


def test_wait_with_flags_set_beforehand(seed):
    m, n, k, chunk_rows = 96, 40, 33, 32
    x, w = operands(seed, m, n, k, torch.float32)
    epoch = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    flags = torch.tensor([3, 4, 3], dtype=torch.int32, device=DEVICE)  # at or past the epoch
    y = gemm(x, w, wait=WaitHook(flags, epoch, chunk_rows), start_chunk=1)
    assert_gemm_close(y, x, w, "waited")


def host_write(t, index, value):
    """Set flag t[index] while a kernel runs. On a GPU a stream write from the extension's own
    non-blocking stream: the current stream is busy with the spinning GEMM, and a setitem or a
    pinned allocation (an implicitly synchronising call) would queue behind it."""
    if t.device.type != "cuda":
        t[index] = value
        return
    signals.write(t, index, value, side_stream(t.device))
    side_stream(t.device).synchronize()


def host_read(t, index):
    """Flag t[index] while a kernel runs (the extension's private stream; see host_write)."""
    return t[index].item() if t.device.type != "cuda" else signals.read(t, index)


@functools.lru_cache(maxsize=None)
def side_stream(device):
    return new_stream(device)


def test_wait_for_a_flag_raised_by_a_host_thread_during_the_run(seed):
    m, n, k, chunk_rows = 64, 40, 33, 32
    x, w = operands(seed, m, n, k, torch.float32)
    flags = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    gemm(x, w, wait=WaitHook(torch.ones_like(flags), 1, chunk_rows))  # tunes and compiles first: the wait must be mid-run
    raised = {}

    def raise_later():
        time.sleep(0.3)
        raised["at"] = time.monotonic()
        host_write(flags, 1, 1)

    thread = threading.Thread(target=raise_later)
    thread.start()
    y = gemm(x, w, wait=WaitHook(flags, 1, chunk_rows))
    returned = time.monotonic()
    thread.join()
    assert returned >= raised["at"], "the GEMM finished before its input arrived"
    assert_gemm_close(y, x, w, "waited on a late flag")


def test_tiles_start_at_the_given_chunk_and_go_around_the_ring(seed):
    """Chunk 2 is ready first; a host thread releases chunk 0 only once chunk 2's tiles are all
    signalled, and chunk 1 only after chunk 0's: the GEMM can only finish by walking 2, 0, 1."""
    n, k = 40, 33
    # One program (the walk is one sequence) of a plan whose tiles never span two chunks: BLOCK_M
    # is 32 interpreted, 64 or 128 on a GPU, and a tile over chunks 0 and 1 would wait for both.
    plan = dataclasses.replace(plan_for(*operands(seed, 96, n, k, torch.float32)), programs=1)
    m, chunk_rows = 3 * plan.block_m, plan.block_m
    x, w = operands(seed, m, n, k, torch.float32)
    outputs = chunk_outputs(m, n, chunk_rows)
    flags = torch.tensor([0, 0, 1], dtype=torch.int32, device=DEVICE)
    counters, signalled = torch.zeros(3, dtype=torch.int32, device=DEVICE), []

    def release_in_ring_order():
        for done, release in ((2, 0), (0, 1)):
            end = time.monotonic() + 30
            while host_read(counters, done) < outputs[done] and time.monotonic() < end:
                time.sleep(0.005)
            signalled.append(host_read(counters, done) == outputs[done])  # before its deadline, not released anyway
            host_write(flags, release, 1)

    thread = threading.Thread(target=release_in_ring_order)
    thread.start()
    y = gemm(x, w, wait=WaitHook(flags, 1, chunk_rows), signal=SignalHook(counters, chunk_rows), start_chunk=2, plan=plan)
    thread.join()
    assert signalled == [True, True] and counters.tolist() == outputs
    assert_gemm_close(y, x, w, "ring order")


def test_a_flag_never_raised_is_a_timeout_naming_the_chunk(seed):
    x, w = operands(seed, 64, 40, 33, torch.float32)
    flags = torch.tensor([2, 1], dtype=torch.int32, device=DEVICE)
    gemm(x, w, wait=WaitHook(flags, 1, 32), wait_timeout=0.1)  # every flag raised: compiled, and passes
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank 3 AG\+GEMM: wait on chunk 1 timed out: expected flag >= 2, observed 1 \(flags \[2, 1\]\)"):
        gemm(x, w, wait=WaitHook(flags, 2, 32, label="rank 3 AG+GEMM"), wait_timeout=0.1)
    elapsed = time.monotonic() - start
    # the GPU times its waits: at least the timeout, not much more; the interpreter counts spins
    assert 0.1 <= elapsed < 5 if DEVICE == "cuda" else elapsed < 60, elapsed


@pytest.mark.gpu
def test_compile_only_loads_the_hooked_kernel_and_launches_nothing(seed):
    """What a fused operator does before its first call: the launch after it compiles nothing."""
    from interlace.kernels.gemm import gemm_kernel

    m, n, k, chunk_rows = 96, 80, 48, 32
    x, w = operands(seed, m, n, k, torch.bfloat16)
    counters, y = torch.zeros(3, dtype=torch.int32, device=DEVICE), torch.full((m, n), float("nan"), dtype=x.dtype, device=DEVICE)
    plan = plan_for(x, w)
    cached = lambda: sum(len(c[0]) for c in gemm_kernel.device_caches.values())  # noqa: E731
    gemm(x, w, out=y, signal=SignalHook(counters, chunk_rows), plan=plan, compile_only=True)
    compiled = cached()
    torch.cuda.synchronize()
    assert counters.tolist() == [0, 0, 0] and y.isnan().all()
    gemm(x, w, out=y, signal=SignalHook(counters, chunk_rows), plan=plan)
    assert cached() == compiled and counters.tolist() == expected_outputs_per_chunk(m, n, chunk_rows)
    assert_gemm_close(y, x, w, "after compile_only")


BAD = [
    (lambda x, w: gemm(x, w[:, :5]), ValueError, r"disagree on K \(8 vs 5\)"),
    (lambda x, w: gemm(x, w.double()), TypeError, r"must share one of"),
    (lambda x, w: gemm(x[0], w), ValueError, r"expects 2-D tensors x \[M, K\] and w \[N, K\], got float32\[8\]"),
    (lambda x, w: gemm(x, w, bias=torch.ones(3, device=DEVICE)), ValueError, r"bias must be \[6\] on .*, got float32\[3\]"),
    (lambda x, w: gemm(x, w, activation="relu"), ValueError, r"activation must be one of \[None, 'silu', 'gelu'\], got 'relu'"),
    (lambda x, w: gemm(x, w, wait=WaitHook(torch.zeros(1, dtype=torch.int32, device=DEVICE), 1, 2)), ValueError,
     r"wait.flags must be a contiguous int32 vector of >= 2 chunks"),
    (lambda x, w: gemm(x, w, wait=WaitHook(torch.zeros(2, dtype=torch.int32, device=DEVICE), 0, 2)), ValueError,
     r"wait.epoch must be >= 1"),
    (lambda x, w: gemm(x, w, wait=WaitHook(torch.zeros(2, dtype=torch.int32, device=DEVICE), torch.ones(1, dtype=torch.int64, device=DEVICE), 2)),
     ValueError, r"a tensor wait.epoch must be 1 int32 element on .*, got int64\[1\]"),
    (lambda x, w: gemm(x, w, wait=WaitHook(torch.zeros(2, dtype=torch.int32, device=DEVICE), torch.ones(2, dtype=torch.int32, device=DEVICE), 2)),
     ValueError, r"a tensor wait.epoch must be 1 int32 element on .*, got int32\[2\]"),
    (lambda x, w: gemm(x, w, signal=SignalHook(torch.zeros(2, dtype=torch.int32, device=DEVICE), 2), start_chunk=2), ValueError,
     r"start_chunk must be in \[0, 2\), got 2"),
    *([(lambda x, w: gemm(x, w, compile_only=True), ValueError, r"compile_only compiles for a GPU, and x is on cpu")]
      if DEVICE == "cpu" else []),
]  # fmt: skip


@pytest.mark.parametrize("call,error,message", BAD, ids=range(len(BAD)))
def test_bad_arguments_are_named(call, error, message):
    x, w = operands(0, 4, 6, 8, torch.float32)
    with pytest.raises(error, match=message):
        call(x, w)


def test_quick_tuning_is_two_of_the_full_candidates_and_bad_modes_are_named(monkeypatch):
    from interlace.kernels import gemm as kernels
    from interlace.ops import gemm as ops

    full, quick, quick_fp32 = kernels.configs(False), kernels.configs(False, quick=True), kernels.configs(False, quick=True, fp32=True)
    assert len(quick) == 2 and all(str(c) in {str(f) for f in full} for c in quick)
    assert [str(c) for c in quick_fp32] == [str(quick[1])]  # the small tile: fp32 has no tensor cores to fill
    for mode, expected in (("quick", True), ("full", False)):
        monkeypatch.setenv("INTERLACE_TUNE", mode)
        assert ops._quick_tuning() is expected
    monkeypatch.setenv("INTERLACE_TUNE", "fast")
    with pytest.raises(ValueError, match="INTERLACE_TUNE must be 'full' or 'quick', got 'fast'"):
        ops._quick_tuning()


@pytest.mark.parametrize("interpreting,triton_version,numpy_version,broken", [
    (True, "3.6.0", "2.4.6", True), (True, "3.6.0+git1a2b", "2.4.0rc1", True), (True, "3.6.0", "2.3.5", False),
    (True, "3.7.1", "2.4.6", False), (False, "3.6.0", "2.5.2", False),
])  # fmt: skip
def test_a_triton_interpreter_that_cannot_run_with_this_numpy_is_named(interpreting, triton_version, numpy_version, broken):
    problem = interpreter_problem(interpreting, triton_version, numpy_version)
    assert (problem is not None) == broken
    assert not broken or f"Triton {triton_version} interpreter (TRITON_INTERPRET=1) fails with numpy {numpy_version}" in problem
