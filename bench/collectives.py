"""Collective microbenchmark in the style of nccl-tests: time, algorithm and bus bandwidth.

For each available transport (``local``: rank threads of one process; ``gloo``: CPU processes;
``nccl``: one process per GPU, only with two or more GPUs; ``symmetric``: processes over shared
memory, POSIX on CPUs, CUDA IPC with two or more GPUs), each collective and message size,
every rank times a loop of back-to-back calls after a barrier; a point's time is the slowest
rank's mean per call, median over repeats. Sizes follow nccl-tests: all_gather counts its output,
the others their input. Bus bandwidth scales algorithm bandwidth (size / time) by the fraction of
data each rank must send on a ring: 2(W-1)/W for all_reduce, (W-1)/W for all_gather,
reduce_scatter and all_to_all, 1 for a ring send/recv. ``of_copy`` is bus bandwidth over one
local memory copy on the same device measured in the same run: data movement on one machine
cannot beat it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import torch

from interlace.engine.comm import spawn

from .common import copy_rate, human_bytes, report_table, slowest_median, timed_samples

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "sendrecv")
BACKENDS = ("local", "gloo", "nccl", "symmetric")


@dataclass
class Config:
    backends: list[str] = field(default_factory=lambda: ["local", "gloo"])
    world_sizes: list[int] = field(default_factory=lambda: [2])
    collectives: list[str] = field(default_factory=lambda: list(COLLECTIVES))
    min_bytes: int = 4 << 10
    max_bytes: int = 16 << 20
    step: int = 4
    dtype: str = "float32"
    check: bool = False
    traffic_per_point: int = 256 << 20  # bytes moved per timed loop; sets the iteration count

    def sizes(self) -> list[int]:
        out, n = [], self.min_bytes
        while n <= self.max_bytes:
            out.append(n)
            n *= self.step
        return out


def busbw_factor(collective: str, world_size: int) -> float:
    if collective == "sendrecv":
        return 1.0
    ring = (world_size - 1) / world_size
    return 2 * ring if collective == "all_reduce" else ring


def iterations(nbytes: int, traffic: int) -> int:
    """Same on every rank (it depends only on the size), between 3 and 100."""
    return max(3, min(100, traffic // max(nbytes, 1)))


def available_backends(requested: list[str]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(backend, device) pairs to run, and the skipped ones with the reason."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    run, skipped = [], []
    for backend in requested:
        if backend == "local":
            run.append(("local", "cuda" if gpus else "cpu"))
        elif backend == "gloo":
            run.append(("gloo", "cpu"))
        elif backend in ("nccl", "symmetric") and gpus >= 2:
            run.append((backend, "cuda"))
        elif backend == "symmetric" and not gpus:
            run.append(("symmetric", "cpu"))
        elif backend in ("nccl", "symmetric"):
            why = "one GPU: its ranks would share it time-sliced, so their timings mean nothing" if gpus == 1 else "no GPU"
            skipped.append({"backend": backend, "why": why})
        else:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return run, skipped


def _buffers(group, collective: str, nbytes: int, dtype: torch.dtype):
    """One call of ``collective`` on about ``nbytes`` (rounded down to whole rows), and its element count."""
    w, dev = group.world_size, group.device
    count = max(w, nbytes // dtype.itemsize // w * w)
    if collective == "all_reduce":  # not in place: repeated in-place sums of ones would overflow to inf
        x, out = torch.ones(count, dtype=dtype, device=dev), torch.empty(count, dtype=dtype, device=dev)
        return lambda: group.all_reduce(x, out=out), count
    if collective == "all_gather":
        x, out = torch.ones(count // w, dtype=dtype, device=dev), torch.empty(count, dtype=dtype, device=dev)
        return lambda: group.all_gather(x, out=out), count
    if collective == "reduce_scatter":
        x, out = torch.ones(count, dtype=dtype, device=dev), torch.empty(count // w, dtype=dtype, device=dev)
        return lambda: group.reduce_scatter(x, out=out), count
    if collective == "all_to_all":
        x, out = torch.ones(count, dtype=dtype, device=dev), torch.empty(count, dtype=dtype, device=dev)
        return lambda: group.all_to_all(x, out=out), count
    x, buf = torch.ones(count, dtype=dtype, device=dev), torch.empty(count, dtype=dtype, device=dev)
    nxt, prev = (group.rank + 1) % w, (group.rank - 1) % w

    def ring():
        send = group.send_async(x, nxt)
        group.recv(buf, prev)
        send.wait()

    return ring, count


def measure_rank(group, config: Config) -> list[dict]:
    """Rank body: per (collective, size) the per-repeat mean seconds per call on this rank."""
    dtype, out = getattr(torch, config.dtype), []
    for collective in config.collectives:
        if collective == "sendrecv" and group.world_size == 1:
            continue
        for nbytes in config.sizes():
            call, count = _buffers(group, collective, nbytes, dtype)
            iters = iterations(nbytes, config.traffic_per_point)
            samples = timed_samples(group, call, iters)
            out.append({"collective": collective, "count": count, "bytes": count * dtype.itemsize, "iters": iters, "samples": samples})
        if group.rank == 0:
            print(f"    {collective}: {len(config.sizes())} sizes done", file=sys.stderr, flush=True)
    return out


def summarize(per_rank: list[list[dict]], backend: str, world_size: int, copy_bps: float, check: bool) -> list[dict]:
    """One row per point: the slowest rank per repeat, median over repeats."""
    rows = []
    for points in zip(*per_rank):
        p = points[0]
        seconds = slowest_median([q["samples"] for q in points])
        algbw = p["bytes"] / seconds
        busbw = algbw * busbw_factor(p["collective"], world_size)
        rows.append({
            "backend": backend, "world_size": world_size, "collective": p["collective"], "bytes": p["bytes"],
            "count": p["count"], "iters": p["iters"], "check": check, "time_us": seconds * 1e6,
            "algbw_GBps": algbw / 1e9, "busbw_GBps": busbw / 1e9, "of_copy": busbw / copy_bps,
        })  # fmt: skip
    return rows


def run(config: Config) -> dict:
    """Measure every available backend and world size; returns rows, skipped backends, copy rates."""
    targets, skipped = available_backends(config.backends)
    rows, copy_rates = [], {}
    for backend, device in targets:
        # bytes copied per second (half the traffic: each is read and written), as a link carries each byte once
        copy_bps = copy_rates.setdefault(device, copy_rate(torch.device(device), config.max_bytes) / 2)
        for w in config.world_sizes:
            print(f"  {backend} ({device}), world size {w}:", file=sys.stderr, flush=True)
            per_rank = spawn(measure_rank, w, backend, timeout=300, device=device, check=config.check, args=(config,))
            rows += summarize(per_rank, backend, w, copy_bps, config.check)
    return {"rows": rows, "skipped": skipped, "copy_GBps": {d: r / 1e9 for d, r in copy_rates.items()}, "config": asdict(config)}


COLUMNS = [
    ("backend", "backend", ""), ("world_size", "W", ""), ("collective", "collective", ""), ("size", "size", ""),
    ("time_us", "time us", ".1f"), ("algbw_GBps", "algbw GB/s", ".3f"), ("busbw_GBps", "busbw GB/s", ".3f"),
    ("of_copy", "of copy", ".1%"),
]  # fmt: skip


def table(result: dict) -> str:
    rows = [{**r, "size": human_bytes(r["bytes"])} for r in result["rows"]]
    head = (f"collectives: {result['config']['dtype']}, checks {'on' if result['config']['check'] else 'off'}; "
            f"local = rank threads of one process (interlace's in-process transport, not a network); "
            f"copy rate {', '.join(f'{d} {v:.1f} GB/s' for d, v in result['copy_GBps'].items())}")  # fmt: skip
    return report_table(head, {**result, "rows": rows}, COLUMNS)
