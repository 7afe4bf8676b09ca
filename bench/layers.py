"""Tensor-parallel layer benchmark: how much of a layer's collective the chunked overlap hides.

Per rank, on shapes named after real model layers at tensor-parallel size W:

| pattern | layer            | GEMM on each rank               | collective                     |
|---------|------------------|---------------------------------|--------------------------------|
| ag_gemm | column + seq-par | [M, K] x [N/W, K]^T, M gathered | all_gather [M/W, K] -> [M, K]  |
| gemm_rs | row + seq-par    | [M, K/W] x [N, K/W]^T           | reduce_scatter [M, N] -> [M/W, N] |
| gemm_ar | row              | [M, K/W] x [N, K/W]^T           | all_reduce [M, N]              |

Timed on every rank at once (each repeat after a barrier; slowest rank, median over repeats):
``gemm`` alone, ``comm`` alone, ``bulk``, ``chunked``, ``fused`` (where it can be timed: a GPU
whose ranks share memory) and ``auto`` (``overlap="auto"``): the dispatcher decides on its first
call from its own measurements (or its cache: ``auto_measured`` says when), and is then timed
like the others, so ``auto/bulk`` checks its choice on fresh runs. With ``ideal = max(gemm, comm)``:
overlap efficiency ``eta = (gemm + comm - chunked) / min(gemm, comm)`` (1 = all hidden, < 0 =
slower than no overlap), speed of light ``sol = ideal / chunked``, ``speedup = bulk / chunked``.
Chunked and fused results are compared with bulk's before anything is timed (each row records
the largest difference); a shape whose fused wait gave up while timing becomes a failed row.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from interlace.engine.comm import spawn
from interlace.engine.overlap import OverlapConfig
from interlace.engine.overlap import collective_matmul as cm
from interlace.engine.overlap.dispatch import default_dispatcher

from .collectives import available_backends
from .common import overlap_metrics, relative_error, report_table, slowest_median, timed_samples

MODELS = {  # hidden, ffn, query heads, kv heads
    "llama3-8b": (4096, 14336, 32, 8),
    "llama3-70b": (8192, 28672, 64, 8),
}
PATTERNS = ("ag_gemm", "gemm_rs", "gemm_ar")
KINDS = ("gemm", "comm", "bulk", "chunked", "fused", "auto")  # fused only where it can be timed


@dataclass
class Config:
    backends: list[str] = field(default_factory=lambda: ["local", "gloo"])
    world_sizes: list[int] = field(default_factory=lambda: [2])
    models: list[str] = field(default_factory=lambda: ["llama3-8b"])
    tokens: list[int] = field(default_factory=lambda: [256])
    patterns: list[str] = field(default_factory=lambda: list(PATTERNS))
    chunks: int = 4
    dtype: str = "float32"
    iters: int = 3
    scale: int = 1
    """Divide every layer width by this (CPU runs use 4: full Llama widths take seconds per GEMM on 2 cores)."""


def layer_shapes(config: Config, world: int) -> list[dict]:
    """(name, pattern, M, N, K) per layer; N and K are the unsharded output and input widths."""
    out = []
    for model in config.models:
        hidden, ffn, heads, kv = MODELS[model]
        hidden, ffn = hidden // config.scale, ffn // config.scale
        head_dim = hidden // heads
        layers = {
            "attn-qkv": ("ag_gemm", (heads + 2 * max(kv, world)) * head_dim, hidden),
            "attn-o": ("gemm_rs", hidden, heads * head_dim),
            "mlp-gate-up": ("ag_gemm", 2 * ffn, hidden),
            "mlp-down": ("gemm_rs", hidden, ffn),
            "attn-o/no-sp": ("gemm_ar", hidden, heads * head_dim),
            "mlp-down/no-sp": ("gemm_ar", hidden, ffn),
        }
        scale = "" if config.scale == 1 else f"/{config.scale}"
        for m in config.tokens:
            for layer, (pattern, n, k) in layers.items():
                if pattern in config.patterns:
                    out.append({"name": f"{model}{scale}/tp{world}/{layer}", "pattern": pattern, "M": m, "N": n, "K": k})
    return out


def _operands(group, shape: dict, dtype: torch.dtype):
    """This rank's input and weight, rank-dependent and random."""
    w, dev = group.world_size, group.device
    g = torch.Generator(device="cpu").manual_seed(1000 + group.rank)
    m, n, k = shape["M"], shape["N"], shape["K"]
    if shape["pattern"] == "ag_gemm":
        x, weight = torch.randn(m // w, k, generator=g), torch.randn(n // w, k, generator=g)
    else:
        x, weight = torch.randn(m, k // w, generator=g), torch.randn(n, k // w, generator=g)
    return x.to(dev, dtype), (weight / k**0.5).to(dev, dtype)


def _calls(group, shape: dict, x: torch.Tensor, weight: torch.Tensor, chunks: int) -> dict:
    """The timed callables of one shape, and ``check``: (run, the strategies compared with bulk's result)."""
    pattern, w = shape["pattern"], group.world_size
    run = {"ag_gemm": lambda c: cm.all_gather_matmul(x, [weight], group, c)[0],
           "gemm_rs": lambda c: cm.matmul_reduce_scatter(x, weight, group, c),
           "gemm_ar": lambda c: cm.matmul_all_reduce(x, weight, group, c)}[pattern]  # fmt: skip
    gemm_input = torch.randn(x.shape[0] * w, x.shape[1], dtype=x.dtype, device=x.device) if pattern == "ag_gemm" else x  # never time on garbage
    product = gemm_input @ weight.T
    comm = {"ag_gemm": lambda: group.all_gather(x, out=gemm_input),
            "gemm_rs": lambda: group.reduce_scatter(product),
            "gemm_ar": lambda: group.all_reduce(product)}[pattern]  # fmt: skip
    strategies = {"bulk": OverlapConfig(strategy="bulk"), "chunked": OverlapConfig(strategy="chunked", chunks=chunks)}
    if _fused_unavailable(group, pattern) is None:
        strategies["fused"] = OverlapConfig(strategy="fused", chunks=chunks, check=False)  # what a proven deployment runs
    strategies["auto"] = OverlapConfig(strategy="auto")
    calls = {name: (lambda c=c: run(c)) for name, c in strategies.items()}
    return {"gemm": lambda: gemm_input @ weight.T, "comm": comm, **calls, "check": (run, strategies)}


def _fused_unavailable(group, pattern: str) -> str | None:
    from interlace.engine.overlap.fused import fused_unavailable  # imports Triton

    return fused_unavailable(group, pattern, timing=True)


def measure_rank(group, config: Config) -> list[dict]:
    if group.device.type == "cpu":  # ranks share the cores: a GEMM per rank on cores/W threads, no oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.world_size))
    dtype, out = getattr(torch, config.dtype), []
    for shape in layer_shapes(config, group.world_size):
        if shape["M"] % group.world_size:
            raise ValueError(f"{shape['name']}: M={shape['M']} tokens is not divisible by the world size {group.world_size}")
        x, weight = _operands(group, shape, dtype)
        calls = _calls(group, shape, x, weight, config.chunks)
        run, strategies = calls.pop("check")
        expected = run(strategies["bulk"])
        if not expected.isfinite().all():  # relative_error compares where the reference is finite
            raise ValueError(f"{shape['name']}: bulk's result holds NaN or inf")
        errors = {name: relative_error(run(strategies[name]), expected) for name in ("chunked", "fused") if name in strategies}
        samples = {kind: timed_samples(group, fn, config.iters) for kind, fn in calls.items()}
        if "fused" in strategies:  # timed with check=False: a wait that gave up must not pass as a fast call
            from interlace.engine.overlap.fused import agreed_failure

            if failure := agreed_failure(group):  # on every rank: the next shape still runs, on new operators
                out.append({**shape, "failed": f"a fused wait gave up while timing: {failure}"})
                continue
        case = cm.dispatch_case(shape["pattern"], group, x, weight.shape[0], checked=strategies["auto"].check)
        decision = default_dispatcher().decide(group, case)  # made by auto's first call
        out.append({**shape, "max_rel_err": errors, "samples": samples, "auto": decision.label(), "auto_why": decision.why,
                    "auto_measured": decision.measured})  # fmt: skip
        if group.rank == 0:
            print(f"    {shape['name']} M={shape['M']}: done", file=sys.stderr, flush=True)
    return out


def summarize(per_rank: list[list[dict]], backend: str, world: int) -> list[dict]:
    rows = []
    for points in zip(*per_rank):
        p = points[0]
        if "failed" in p:  # every rank's row says so; the one naming its own failure first
            from interlace.engine.overlap.fused.workspaces import FUSED_WAIT  # imports Triton

            why = sorted((q["failed"] for q in points), key=lambda text: f"{FUSED_WAIT} failed on rank(s)" in text)[0]
            rows.append({"backend": backend, "world_size": world, **{k: p[k] for k in ("name", "pattern", "M", "N", "K")}, "failed": why})
            continue
        t = {kind: slowest_median([q["samples"][kind] for q in points]) for kind in KINDS if kind in p["samples"]}
        m = overlap_metrics(t)
        flops = 2 * p["M"] * p["N"] * p["K"] / world
        rows.append({
            "backend": backend, "world_size": world, "name": p["name"], "pattern": p["pattern"],
            "M": p["M"], "N": p["N"], "K": p["K"], **{f"{k}_us": v * 1e6 for k, v in t.items()}, "ideal_us": m["ideal"] * 1e6,
            "eta": m["chunked_eta"], "sol": m["chunked_sol"], "speedup": m["chunked_speedup"], "gemm_tflops": flops / t["gemm"] / 1e12,
            **{f"{name}_max_rel_err": max(q["max_rel_err"][name] for q in points) for name in p["max_rel_err"]},
            **({"fused_eta": m["fused_eta"], "fused_sol": m["fused_sol"]} if "fused" in t else {}),
            "auto": p["auto"], "auto_why": p["auto_why"], "auto_measured": p["auto_measured"], "auto_vs_bulk": t["auto"] / t["bulk"],
        })  # fmt: skip
    return rows


def run(config: Config, checkpoint: Callable[[list[dict]], None] | None = None) -> dict:
    """Every backend and world size, ``checkpoint(rows)`` after each."""
    targets, skipped = available_backends(config.backends)
    rows = []
    for backend, device in targets:
        for w in config.world_sizes:
            print(f"  {backend} ({device}), world size {w}:", file=sys.stderr, flush=True)
            per_rank = spawn(measure_rank, w, backend, timeout=600, device=device, check=False, args=(config,))
            rows += summarize(per_rank, backend, w)
            if checkpoint is not None:
                checkpoint(rows)
    return {"rows": rows, "skipped": skipped, "config": asdict(config), "cpu_count": os.cpu_count()}


COLUMNS = [
    ("backend", "backend", ""), ("name", "layer", ""), ("M", "M", ""), ("gemm_us", "gemm us", ".0f"),
    ("comm_us", "comm us", ".0f"), ("bulk_us", "bulk us", ".0f"), ("chunked_us", "chunked us", ".0f"),
    ("ideal_us", "ideal us", ".0f"), ("eta", "eta", ".2f"), ("sol", "SOL", ".2f"), ("speedup", "speedup", ".2f"),
    ("fused_us", "fused us", ".0f"), ("auto", "auto", ""), ("auto_vs_bulk", "auto/bulk", ".2f"),
]  # fmt: skip


def table(result: dict) -> str:
    c = result["config"]
    head = (f"tensor-parallel layers: {c['dtype']}, {c['chunks']} chunks, all ranks timed together (slowest rank, "
            f"median of 5); ideal = max(gemm, comm); eta = hidden fraction of the smaller; local = rank threads")  # fmt: skip
    return report_table(head, result, COLUMNS)
