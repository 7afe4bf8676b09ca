"""Decode's row-parallel epilogue, one rank's slice on one GPU: unfused vs the fused kernel.

After a decode step's attention output projection (row-parallel, this rank's partial ``[M, H]``),
a rank all-reduces the partials, adds the residual and applies the post-attention RMSNorm. Here
the peers' partials are W-1 buffers in this GPU's memory (the ``d2d`` regime of the rank-slice
harness: HBM, faster than NVLink), and each variant reads them directly:

- ``unfused``: what interlace's layers run without the fusion, on one rank: the sum of the W
  partials (one-shot, in rank order), the residual add, and Hugging Face's RMSNorm (fp32 upcast,
  mean of squares, rsqrt, weight): about ten kernels;
- ``fused``: ``allreduce_residual_rmsnorm_kernel``, one kernel reading the W partials, inside
  the per-call flag protocol of ``FusedAllReduceResidualNorm`` with ``check=False`` (stream waits
  and writes on a lane stream, the partial copied into this rank's slot, an event for the
  watchdog); ``kernel``: the kernel alone. Both carry the operator's own host work per call
  (views, output allocations). The default ``check=True`` adds a host synchronisation per call,
  which these numbers leave out.

Both are checked against float64 first; a shape that fails becomes a row with ``failed``.
``floor_us`` is the bytes either must move (W partials, the residual and the weight read; output
and new residual written) at the device copy rate measured in the same run. At decode sizes
both are expected far above it (launches dominate, and that is what fusing saves): not yet measured. Times are CUDA-event
medians of eager calls, as a decode loop without CUDA graphs runs them.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .common import around, copy_rate, event_median, relative_error, report_table, settle
from .layers import MODELS

WARMUP = 5


@dataclass
class Config:
    models: list[str] = field(default_factory=lambda: ["llama3-8b", "llama3-70b"])
    world_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])
    tokens: list[int] = field(default_factory=lambda: [1, 8, 16, 64])
    dtype: str = "bfloat16"
    iters: int = 50


def run(config: Config, checkpoint: Callable[[list[dict]], None] | None = None) -> dict:
    """Every (model, world size, M), ``checkpoint(rows)`` after each."""
    if not torch.cuda.is_available():
        why = "needs a GPU: under the Triton interpreter a timing measures Python, not a kernel"
        return {"rows": [], "skipped": [{"backend": "decode", "why": why}], "config": asdict(config)}
    dtype, rows = getattr(torch, config.dtype), []
    copy_bps = copy_rate(torch.device("cuda"), 1 << 30)
    for model in config.models:
        hidden = MODELS[model][0]
        for world in config.world_sizes:
            for m in config.tokens:
                name = f"{model}/tp{world}/attn-o-epilogue/m{m}"
                print(f"  {name}", file=sys.stderr, flush=True)
                measured = _measure(m, hidden, world, dtype, config.iters, copy_bps)
                rows.append({"name": name, "world_size": world, "M": m, "H": hidden, **measured})
                if checkpoint is not None:
                    checkpoint(rows)
    return {"rows": rows, "skipped": [], "config": asdict(config)}


def _measure(m: int, hidden: int, world: int, dtype: torch.dtype, iters: int, copy_bps: float) -> dict:
    from interlace.ops.reduce import allreduce_residual_rmsnorm

    partials = [torch.randn(m, hidden, device="cuda", dtype=dtype) for _ in range(world)]
    residual = torch.randn(m, hidden, device="cuda", dtype=dtype) * 4
    weight = torch.rand(hidden, device="cuda", dtype=dtype) + 0.5
    eps = 1e-5

    def unfused():
        total = partials[0]
        for p in partials[1:]:
            total = total + p
        new = residual + total
        x32 = new.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype), new

    def kernel():  # with the operator's host work per call: peer views, two outputs allocated
        return allreduce_residual_rmsnorm([p.view(m, hidden) for p in partials], residual, weight, eps)

    fused = _with_protocol(kernel, partials, world)

    exact = residual.double() + sum(p.double() for p in partials)
    exact_normed = weight.double() * exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + eps)
    for variant, fn in (("unfused", unfused), ("fused", fused)):
        got_both = fn()
        settle(f"decode m{m} tp{world}: checking {variant}")
        for what, got, want in zip(("output", "residual"), got_both, (exact_normed, exact)):
            error = relative_error(got, want)
            if not error < 2e-2:  # bf16 rounding, relative to the largest element
                return {"failed": f"{variant} {what} off by {error:.3g} (relative) against float64"}
    variants = {"unfused": unfused, "fused": fused, "kernel": kernel}
    times = {variant: event_median(around(fn), iters, warmup=WARMUP, what=f"decode m{m} tp{world} {variant}")
             for variant, fn in variants.items()}  # fmt: skip
    moved = (world + 3) * m * hidden * residual.element_size() + hidden * weight.element_size()  # see the module doc
    floor = moved / copy_bps
    return {"unfused_us": times["unfused"] * 1e6, "fused_us": times["fused"] * 1e6, "kernel_us": times["kernel"] * 1e6,
            "floor_us": floor * 1e6, "speedup": times["unfused"] / times["fused"], "fused_sol": floor / times["fused"]}  # fmt: skip


def _with_protocol(kernel: Callable[[], tuple], partials: list[torch.Tensor], world: int) -> Callable[[], tuple]:
    """``kernel`` inside FusedAllReduceResidualNorm's per-call protocol, as one rank runs it: advance
    the device epoch; on a lane stream wait for the peers' DONE flags of the last call, copy the
    partial into this rank's slot (``partials[0]``, the slot the kernel reads), raise READY and wait
    for the peers' READY; the kernel on the caller's stream; DONE from the lane; an event for the
    watchdog. The peers' flags are stand-ins raised long ago, so no wait blocks."""
    from interlace.engine.comm import signals
    from interlace.engine.device import new_stream

    cur, lane = torch.cuda.current_stream(), new_stream(torch.device("cuda"))
    ready, done = 0, 1
    flags = [torch.full((2,), 2**30, dtype=torch.int32, device="cuda") for _ in range(world)]  # flags[0]: this rank's
    partial, epoch_now, epochs = partials[0].clone(), torch.zeros(1, dtype=torch.int32, device="cuda"), itertools.count(1)

    def call():
        e = next(epochs)
        epoch_now.add_(1)
        lane.wait_stream(cur)
        for q in range(1, world):
            signals.wait(flags[q], done, e - 1, lane)
        cur.wait_stream(lane)
        lane.wait_stream(cur)
        with torch.cuda.stream(lane):
            partials[0].copy_(partial)
        signals.write(flags[0], ready, e, lane)
        for q in range(1, world):
            signals.wait(flags[q], ready, e, lane)
        cur.wait_stream(lane)
        result = kernel()
        lane.wait_stream(cur)
        signals.write(flags[0], done, e, lane)
        cur.wait_stream(lane)
        cur.record_event()
        return result

    return call


COLUMNS = [
    ("name", "epilogue", ""), ("unfused_us", "unfused us", ".1f"), ("fused_us", "fused us", ".1f"), ("kernel_us", "kernel us", ".1f"),
    ("floor_us", "floor us", ".2f"), ("speedup", "speedup", ".2f"), ("fused_sol", "fused of floor", ".1%"),
]  # fmt: skip


def table(result: dict) -> str:
    c = result["config"]
    head = (f"decode epilogue: one rank's all-reduce + residual + RMSNorm, peers' partials in this GPU's memory (d2d), "
            f"{c['dtype']}; CUDA events around eager calls, median of {c['iters']}")  # fmt: skip
    return report_table(head, result, COLUMNS)
