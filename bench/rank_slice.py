"""Rank-slice harness: one rank's real timeline on one GPU, against the physical limit.

For one rank of a W-way tensor-parallel layer: its real GEMM, and the real per-rank communication
volume moved by the copy engines between local buffers that stand in for peers, in two regimes:
``d2d`` (peers' data in device memory: HBM speed, faster than NVLink) and ``host`` (pinned host
memory: PCIe speed). Measured with CUDA events, median of ``iters`` after warm-up:

| pattern | GEMM (this rank)            | communication (copy engines)                  |
|---------|-----------------------------|-----------------------------------------------|
| ag_gemm | [W n, K] x [N/W, K]^T        | pull W-1 peer shards [n, K] into the gathered rows while this rank's goes to W-1 peers |
| gemm_rs | [W n, K/W] x [N, K/W]^T      | send W-1 blocks [n, N] out while W-1 come in, reduce |
| gemm_ar | [M, K/W] x [N, K/W]^T        | send the partial [M, N] to W-1 peers while theirs come in, reduce (one-shot) |
| gemm_ar_two_shot | as gemm_ar              | per row chunk: send piece q to rank q while the peers' pieces of this rank's come in, reduce, send the sum to W-1 peers while theirs come in |

Outbound and inbound copies run on two streams, as a link carries both directions at once; ranks
run in lockstep, so a peer's chunk is there when this rank has finished the same step.

Communication is also held against its floor: the bytes this rank moves each way, after
what it copies within its own memory first (``link_bytes``), at the rates the links reach in the same run (``rank_slice_gpu.link_rates``),
``comm_sol = floor / comm`` (1: the copies run at the link's limit).

Strategies: ``bulk`` (communication, then GEMM, or the reverse), ``chunked`` (per-chunk copies
and cuBLAS GEMMs joined by events), ``fused`` (copy-engine chunks raising flags + ONE Triton GEMM
with the wait hook, or the GEMM's signal hook and stream waits). Metrics per shape:
``ideal = max(gemm, comm)``, ``eta = (gemm + comm - t) / min(gemm, comm)``, ``sol = ideal / t``,
GEMM slowdown under overlap (for AG: the GEMM beside the copies, not waiting for them), speedup
over bulk (``common.overlap_metrics``). Fused runs as a ``check=False`` call: the library's default
check, a host synchronisation after each call, is not in these times. Every number is labelled
with its regime.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .common import StuckStream, overlap_metrics, report_table
from .layers import MODELS

PATTERNS = ("ag_gemm", "gemm_rs", "gemm_ar", "gemm_ar_two_shot")
STRATEGIES = ("bulk", "chunked", "fused")
# What rank_slice_gpu.measure times on every row (``auto`` too where the pick is not bulk): a row
# an earlier harness measured without one of these is measured again by --resume.
TIMED = ("gemm", "gemm_triton", "gemm_hooked", "comm", *STRATEGIES, "fused_gemm", "bulk_again")
REGIMES = ("d2d", "host")
ROW_CHUNKS = 4  # row chunks of the GEMM+AR variants (rank_slice_gpu)


@dataclass
class Config:
    world_size: int = 8
    models: list[str] = field(default_factory=lambda: ["llama3-8b", "llama3-70b"])
    tokens: list[int] = field(default_factory=lambda: [2048, 8192])
    patterns: list[str] = field(default_factory=lambda: list(PATTERNS))
    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    dtype: str = "bfloat16"
    iters: int = 10


def shapes(config: Config) -> list[dict]:
    """Named per-rank layer shapes: (pattern, M tokens, N output, K reduction) of the full layer."""
    out = []
    for model in config.models:
        hidden, ffn, heads, kv = MODELS[model]
        d, w = hidden // heads, config.world_size
        layers = {"ag_gemm": {"attn-qkv": ((heads + 2 * max(kv, w)) * d, hidden), "mlp-gate-up": (2 * ffn, hidden)},
                  "gemm_rs": {"attn-o": (hidden, heads * d), "mlp-down": (hidden, ffn)},
                  "gemm_ar": {"attn-o": (hidden, heads * d), "mlp-down": (hidden, ffn)}}  # fmt: skip
        layers["gemm_ar_two_shot"] = layers["gemm_ar"]
        for pattern in config.patterns:
            for layer, (n, k) in layers[pattern].items():
                for m in config.tokens:
                    _check_split(f"{model}/tp{w}/{layer}", pattern, w, m, n, k)
                    out.append({"name": f"{model}/tp{w}/{layer}/m{m}", "pattern": pattern, "M": m, "N": n, "K": k})
    return out


def _check_split(name: str, pattern: str, world: int, m: int, n: int, k: int) -> None:
    """The harness cuts N (AG) or K (RS, AR) into W shards and M into W blocks (AG, RS): a remainder
    would time a smaller GEMM under the layer's name, or leave rows of a buffer unwritten. AR's row
    chunks take any M, cut as the operators cut them."""
    problems = [f"N={n} is not a multiple of the world size {world}"] if pattern == "ag_gemm" and n % world else []
    problems += [f"K={k} is not a multiple of the world size {world}"] if pattern != "ag_gemm" and k % world else []
    if pattern in ("ag_gemm", "gemm_rs"):
        problems += [f"M={m} is not a multiple of the world size {world}"] if m % world else []
    if problems:
        raise ValueError(f"rank slice {name}: {'; '.join(problems)}")


def link_bytes(shape: dict, world: int, itemsize: int) -> tuple[int, int]:
    """(bytes one rank moves over its links in each direction, in and out alike; bytes it copies
    within its own memory first). Over the links: W-1 shards [M/W, K] (AG), W-1 blocks [M/W, N]
    (RS), W-1 partials [M, N] (one-shot AR), 2(W-1)/W of [M, N] (two-shot). Within: AG's own
    shard, into the gathered rows."""
    m, n, k, w = shape["M"], shape["N"], shape["K"], world
    elements = {"ag_gemm": (w - 1) * (m // w) * k, "gemm_rs": (w - 1) * (m // w) * n, "gemm_ar": (w - 1) * m * n,
                "gemm_ar_two_shot": 2 * (w - 1) * m * n // w}[shape["pattern"]]  # fmt: skip
    local = (m // w) * k if shape["pattern"] == "ag_gemm" else 0
    return elements * itemsize, local * itemsize


def comm_floor(regime: str, each_way: int, local: int, rates: dict[str, float]) -> float:
    """Seconds ``each_way`` bytes in and as many out, after ``local`` bytes copied in device memory
    on the inbound stream, take at ``rates`` (``link_rates``): in device memory every byte is read
    and written, both directions sharing it; over PCIe the two directions run side by side."""
    first = 2 * local / rates["d2d"]
    if regime == "d2d":
        return first + 4 * each_way / rates["d2d"]
    return max(first + each_way / rates["h2d"], each_way / rates["d2h"])


def run(config: Config, checkpoint: Callable[[list[dict]], None] | None = None, earlier: dict | None = None) -> dict:
    """Every shape in every regime, d2d (the targets') first; ``checkpoint(rows)`` after each. A
    shape whose overlapped result differs from bulk's, whose fused wait gave up, or that raised,
    becomes a row with its ``failed`` (why) (the next shape still runs); one whose GPU work never
    finishes becomes a row marked ``stuck``, and ``StuckStream`` ends the run (nothing more can run
    behind a blocked stream). ``earlier``: a result of these settings (a run cut off) whose
    measured and stuck rows are kept, each saying which run measured it (``earlier_run``), and not
    measured again: a resumed run goes past the shape that stopped the last one."""
    kept = _measured(earlier) if earlier is not None else {}
    if not torch.cuda.is_available():  # what an earlier run measured stays in the file
        why = "needs a GPU: the harness times copy engines and kernels on one device"
        return {"rows": list(kept.values()), "skipped": [{"backend": "rank_slice", "why": why}], "config": asdict(config),
                **({"complete": False} if kept else {})}  # fmt: skip
    from . import rank_slice_gpu

    rows, cases = [], [(shape, regime) for regime in config.regimes for shape in shapes(config)]
    rates, itemsize = rank_slice_gpu.link_rates(), torch.empty(0, dtype=getattr(torch, config.dtype)).element_size()
    for i, (shape, regime) in enumerate(cases):
        if (shape["name"], shape["pattern"], regime) in kept:
            rows.append(kept[shape["name"], shape["pattern"], regime])
            continue
        print(f"  [{i + 1}/{len(cases)}] {shape['name']} [{regime}]", file=sys.stderr, flush=True)
        row = {**shape, "regime": regime, "world_size": config.world_size}
        try:
            times, chosen = rank_slice_gpu.measure(shape, regime, config.world_size, getattr(torch, config.dtype), config.iters)
        except StuckStream as error:
            rows.append({**row, "failed": str(error), "stuck": True})
            if checkpoint is not None:
                checkpoint(rows)
            raise
        except Exception as error:  # this shape's failure, named in its row; the next shape still runs
            traceback.print_exc()  # where it failed, in the log: a failure first seen on a lent GPU is found from the log alone
            rows.append({**row, "failed": f"{type(error).__name__}: {error}"})
        else:
            derived = overlap_metrics(times)
            derived["ideal_us"] = derived.pop("ideal") * 1e6
            floor = comm_floor(regime, *link_bytes(shape, config.world_size, itemsize), rates)
            derived |= {"comm_floor_us": floor * 1e6, "comm_sol": floor / times["comm"]}
            rows.append({**row, **{f"{k}_us": v * 1e6 for k, v in times.items()}, **derived, "auto": chosen})
        if checkpoint is not None:
            checkpoint(rows)
    return {"rows": rows, "skipped": [], "config": asdict(config), "link_GBps": {k: v / 1e9 for k, v in rates.items()}}


def _measured(earlier: dict) -> dict[tuple[str, str, str], dict]:
    """``earlier``'s measured (and stuck) rows by (name, pattern, regime), each naming the run that
    measured it; not a row that lacks a time this harness takes (an older harness measured it)."""
    env = earlier["envelope"]
    origin = {"commit": env["interlace"]["commit"], "timestamp": env["timestamp"], "tuning": env["interlace"].get("tuning")}
    current = [r for r in earlier["rows"] if r.get("stuck") or ("failed" not in r and "comm_sol" in r and all(f"{t}_us" in r for t in TIMED))]
    return {(r["name"], r["pattern"], r["regime"]): {**r, "earlier_run": r.get("earlier_run", origin)} for r in current}


COLUMNS = [
    ("name", "layer", ""), ("pattern", "pattern", ""), ("regime", "regime", ""), ("gemm_us", "gemm us", ".0f"), ("comm_us", "comm us", ".0f"), ("comm_sol", "comm SOL", ".2f"),
    ("bulk_us", "bulk us", ".0f"), ("chunked_us", "chunked us", ".0f"), ("fused_us", "fused us", ".0f"),
    ("ideal_us", "ideal us", ".0f"), ("fused_eta", "fused eta", ".2f"), ("fused_sol", "fused SOL", ".2f"),
    ("fused_gemm_slowdown", "GEMM slowdown", ".2f"), ("hook_cost", "hook cost", ".2f"), ("fused_speedup", "vs bulk", ".2f"),
]  # fmt: skip


def table(result: dict) -> str:
    c = result["config"]
    head = (f"rank slice: one rank of TP={c['world_size']}, {c['dtype']}, copy engines standing in for peers "
            f"(d2d: device memory, host: pinned host memory over PCIe); CUDA events, median of {c['iters']}")  # fmt: skip
    return report_table(head, result, COLUMNS)
