"""GEMM benchmark: interlace's Triton GEMM against torch.matmul (cuBLAS), side by side, on a GPU.

Named shapes: square 4096 and 8192, and Llama-3-70B's per-rank layers at TP=8 for M in
{16, 128, 2048, 8192}. Per shape: TFLOP/s of both and their ratio, then the same GEMM with the
wait hook (flags pre-set), the signal hook, and both, to price the hooks. Each result is checked
against cuBLAS (relative error ``|y - ref| / |ref|``) before it is timed. Times are
``triton.testing.do_bench`` medians over rotating weight copies (at least twice the L2 in all),
so small-M shapes read their weights from memory as a model's layers do. ``floor_us`` is the
roofline with ceilings measured in the same run (cuBLAS at 8192^3, a large device copy):
``max(flops / peak_flops, bytes / copy_rate)``. ``gave_up_s``: how long a wait on a flag never
raised, asked to give up after ``GIVE_UP_AFTER_S``, takes, in the GEMM and in the flag kernel (the
GPU's timer bounds a wait: about the timeout, not much more).
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .common import StuckStream, copy_rate, report_table, settle

LLAMA3_70B_TP8 = {"qkv": (1280, 8192), "o": (8192, 1024), "gate-up": (7168, 8192), "down": (8192, 3584)}  # N, K per rank
TOKENS = (16, 128, 2048, 8192)
GIVE_UP_AFTER_S = 0.01
MAX_REL_ERR = {"bfloat16": 1e-2, "float16": 5e-3, "float32": 1e-4}  # bf16 keeps 8 bits of mantissa: its sums land in 1e-3..1e-2


def shapes() -> dict[str, tuple[int, int, int]]:
    table = {"square-4096": (4096, 4096, 4096), "square-8192": (8192, 8192, 8192)}
    for m in TOKENS:
        for layer, (n, k) in LLAMA3_70B_TP8.items():
            table[f"llama3-70b/tp8/{layer}/m{m}"] = (m, n, k)
    return table


@dataclass
class Config:
    dtype: str = "bfloat16"
    shapes: list[str] = field(default_factory=lambda: list(shapes()))
    chunks: int = 8
    """Hook chunks per GEMM (one per rank at TP=8)."""


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def run(config: Config, checkpoint: Callable[[list[dict]], None] | None = None) -> dict:
    """Every shape, ``checkpoint(rows)`` after each; a shape whose result is wrong becomes a row
    with its ``failed`` (why)."""
    if not torch.cuda.is_available():
        why = "needs a GPU: under the Triton interpreter a timing measures Python, not a kernel"
        return {"rows": [], "skipped": [{"backend": "gemm", "why": why}], "config": asdict(config), "summary": {}}
    from interlace.ops.gemm import plan_for

    dtype, device = getattr(torch, config.dtype), torch.device("cuda")
    peak = _peak_flops(dtype)
    copy_bps = copy_rate(device, 1 << 30)
    rows = []
    for name in config.shapes:
        m, n, k = shapes()[name]
        print(f"  {name}", file=sys.stderr, flush=True)
        try:
            rows.append(_measure(name, m, n, k, dtype, config.chunks, peak, copy_bps, plan_for))
        except StuckStream:  # nothing more can run behind a blocked stream
            raise
        except Exception as error:  # a wrong result, no memory, a config that did not compile: named; the next shape still runs
            traceback.print_exc()
            rows.append({"name": name, "M": m, "N": n, "K": k, "failed": f"{type(error).__name__}: {error}"})
        if checkpoint is not None:
            checkpoint(rows)
    measured = [r for r in rows if "failed" not in r]
    big = [r["ratio"] for r in measured if r["M"] >= 2048]
    summary = {"geomean_ratio_m_ge_2048": geomean(big), "max_hook_cost": max((r["hook_cost"] for r in measured), default=None),
               "peak_tflops_measured": peak / 1e12, "copy_GBps_measured": copy_bps / 1e9, **_give_up_times(dtype)}  # fmt: skip
    return {"rows": rows, "skipped": [], "config": asdict(config), "summary": summary}


def _measure(name, m, n, k, dtype, chunks, peak, copy_bps, plan_for) -> dict:
    from triton.testing import do_bench

    from interlace.ops.gemm import SignalHook, WaitHook, gemm

    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(_copies(n * k * x.element_size()))]
    ref = torch.matmul(x, ws[0].T).float()

    def error(y: torch.Tensor) -> float:
        return ((y.float() - ref).norm() / ref.norm()).item()

    err, bound = error(gemm(x, ws[0])), MAX_REL_ERR[str(dtype).removeprefix("torch.")]
    if not err <= bound:
        raise AssertionError(f"{name}: interlace GEMM relative error {err:.2e} against cuBLAS; not timing a wrong kernel")
    plan = plan_for(x, ws[0])
    chunk_rows = max(1, -(-m // chunks))
    flags = torch.ones(-(-m // chunk_rows), dtype=torch.int32, device="cuda")
    counters = torch.zeros_like(flags)
    epoch = torch.ones(1, dtype=torch.int32, device="cuda")
    hooks = {"plain": {}, "wait": {"wait": WaitHook(flags, epoch, chunk_rows)}, "signal": {"signal": SignalHook(counters, chunk_rows)}}
    hooks["both"] = {**hooks["wait"], **hooks["signal"]}
    turn = itertools.count()

    def timed(fn):
        return do_bench(lambda: fn(ws[next(turn) % len(ws)]), warmup=25, rep=100, return_mode="median") * 1e-3

    status = torch.zeros(4, dtype=torch.int32, device="cuda")  # given, or a wait allocates and zeroes one per call
    for kind, kw in hooks.items():  # the hooked variants too: one whose hooks broke the result is not timed
        hooked_err = error(gemm(x, ws[0], plan=plan, check=False, status=status, **kw))
        if not hooked_err <= bound:
            raise AssertionError(f"{name}: interlace GEMM with hooks {kind!r} has relative error {hooked_err:.2e} against cuBLAS")
    t = {kind: timed(lambda w, kw=kw: gemm(x, w, plan=plan, check=False, status=status, **kw)) for kind, kw in hooks.items()}
    if status.any():
        raise AssertionError(f"{name}: a timed wait gave up: status {status.tolist()}")
    t["cublas"] = timed(lambda w: torch.matmul(x, w.T))
    flops = 2 * m * n * k
    floor = max(flops / peak, (m * k + n * k + m * n) * x.element_size() / copy_bps)
    return {
        "name": name, "M": m, "N": n, "K": k, "rel_err": err, "block": f"{plan.block_m}x{plan.block_n}x{plan.block_k}",
        **{f"{kind}_us": v * 1e6 for kind, v in t.items()}, "floor_us": floor * 1e6,
        "interlace_tflops": flops / t["plain"] / 1e12, "cublas_tflops": flops / t["cublas"] / 1e12,
        "ratio": t["cublas"] / t["plain"], "sol": floor / t["plain"],
        "hook_cost": max(t["wait"], t["signal"], t["both"]) / t["plain"] - 1,
    }  # fmt: skip


def _give_up_times(dtype: torch.dtype, runs: int = 5) -> dict:
    """Median seconds (CUDA events) a wait on a flag never raised takes to give up when asked to after
    ``GIVE_UP_AFTER_S``: the GEMM's (one wave of tiles, each waiting) and the flag kernel's."""
    from interlace.ops import flags as epoch_flags
    from interlace.ops.gemm import WaitHook, gemm

    x, w = torch.randn(1024, 1024, device="cuda", dtype=dtype), torch.randn(1024, 1024, device="cuda", dtype=dtype)
    never, epoch = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.ones(1, dtype=torch.int32, device="cuda")
    waits = {
        "gemm": lambda status: gemm(x, w, wait=WaitHook(never, epoch, 1024), wait_timeout=GIVE_UP_AFTER_S, check=False, status=status),
        "flag": lambda status: epoch_flags.wait(never, 0, epoch_flags.EpochValue(epoch), status, 0, GIVE_UP_AFTER_S),
    }  # fmt: skip
    out = {"give_up_asked_s": GIVE_UP_AFTER_S}
    for name, wait in waits.items():
        samples = []
        for run in range(runs + 1):  # the first compiles: untimed
            status = torch.zeros(4, dtype=torch.int32, device="cuda")  # fresh: a recorded failure makes later waits give up at once
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            wait(status)
            end.record()
            settle(f"gemm bench: a {name} wait asked to give up after {GIVE_UP_AFTER_S} s")
            if not status[0].item():
                raise AssertionError(f"gemm bench: a {name} wait on a flag never raised did not record giving up: {status.tolist()}")
            if run:
                samples.append(start.elapsed_time(end) * 1e-3)
        out[f"{name}_gave_up_s"] = statistics.median(samples)
    return out


def _copies(weight_bytes: int) -> int:
    """Weight copies so that rotating through them spans at least twice the L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(32, -(-2 * l2 // weight_bytes)))


def _peak_flops(dtype: torch.dtype) -> float:
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    return 2 * 8192**3 / (do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median") * 1e-3)


COLUMNS = [
    ("name", "shape", ""), ("block", "block", ""), ("interlace_tflops", "interlace TF/s", ".0f"),
    ("cublas_tflops", "cuBLAS TF/s", ".0f"), ("ratio", "ratio", ".2f"), ("sol", "of floor", ".0%"),
    ("hook_cost", "hooks cost", "+.1%"),
]  # fmt: skip


def table(result: dict) -> str:
    head = f"gemm: {result['config']['dtype']}, interlace Triton GEMM vs torch.matmul (cuBLAS), do_bench medians"
    s = result["summary"]
    if s and s["max_hook_cost"] is not None:
        head += (f"\ngeomean ratio over M >= 2048: {s['geomean_ratio_m_ge_2048']:.3f}; max hook cost {s['max_hook_cost']:+.1%}; "
                 f"measured peak {s['peak_tflops_measured']:.0f} TF/s, copy {s['copy_GBps_measured']:.0f} GB/s; "
                 f"waits asked to give up after {s['give_up_asked_s'] * 1e3:.0f} ms gave up after "
                 f"{s['gemm_gave_up_s'] * 1e3:.1f} ms (GEMM), {s['flag_gave_up_s'] * 1e3:.1f} ms (flag kernel)")  # fmt: skip
    return report_table(head, result, COLUMNS)
