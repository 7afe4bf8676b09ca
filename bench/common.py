"""Shared by every benchmark: result files with the envelope, tables, sizes, timing."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from interlace.engine.device import drain_within
from interlace.engine.device import synchronize as sync
from interlace.engine.telemetry import envelope

OUT_DIR = Path(__file__).resolve().parent / "out"
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def result_path(name: str, out: Path | None = None) -> Path:
    """``out``, or ``bench/out/<name>-<time>.json``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(out) if out is not None else OUT_DIR / f"{name}-{stamp}.json"


def write_result(name: str, config: dict[str, Any], rows: list[dict[str, Any]], out: Path | None = None,
                 env: dict[str, Any] | None = None, **extra: Any) -> Path:  # fmt: skip
    """Write ``{"benchmark", "envelope", "config", "rows", ...}`` as JSON and return the path.
    ``env``: the envelope, taken once per run by a caller that writes many times (its timestamp is
    then the run's start); else taken now."""
    path = result_path(name, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(sys.argv[1:])
    payload = {"benchmark": name, "command": command, "envelope": env or envelope(), "config": config, "rows": rows, **extra}
    partial = path.with_name(path.name + ".partial")  # a run killed while writing leaves the last complete file
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(partial, path)
    return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; ``columns`` are (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_table(head: str, result: dict[str, Any], columns: Sequence[tuple[str, str, str]]) -> str:
    """A benchmark's printed result: how it was measured, what was skipped and why, the rows, and
    the rows that failed (those with ``failed``, saying why)."""
    lines = [head] + [f"skipped {s['backend']}: {s['why']}" for s in result.get("skipped", [])]
    measured = [r for r in result["rows"] if "failed" not in r]
    if measured:
        lines.append(format_table(measured, columns))
    lines += [f"FAILED {row_label(r)}: {r['failed']}" for r in result["rows"] if "failed" in r]
    return "\n".join(lines)


def row_label(row: dict[str, Any]) -> str:
    """``name [pattern, regime]``, with those of the two the row has: one layer's name recurs under
    several patterns (its GEMM as RS, one-shot AR, two-shot AR) and regimes."""
    tags = [row[key] for key in ("pattern", "regime") if key in row]
    return row["name"] + (f" [{', '.join(tags)}]" if tags else "")


def overlap_metrics(t: dict[str, float]) -> dict[str, float]:
    """The numbers for one overlapped operator, from median seconds of ``gemm``, ``comm``,
    ``bulk`` and any of ``chunked``, ``fused`` (and ``fused_gemm``, ``gemm_hooked``, ``gemm_triton``:
    the GEMM inside the fused run; the same GEMM alone, its plan and hooks, with nothing to wait
    for; the Triton GEMM on every SM without hooks): ``ideal = max(gemm, comm)``; per strategy s,
    overlap efficiency ``(gemm + comm - s) / min(gemm, comm)``, speed of light ``ideal / s``,
    speedup ``bulk / s``. ``gemm`` is cuBLAS's: fused's eta and SOL count its GEMM's speed as well
    as the overlap; ``fused_eta_own``/``fused_sol_own`` put its own GEMM alone (``gemm_hooked``)
    in cuBLAS's place, and so measure the overlap only. ``fused_gemm_slowdown``: the GEMM under
    overlap over the same GEMM alone; ``hook_cost``: that GEMM alone over the Triton GEMM on every
    SM without hooks (the SMs fused leaves free, and the hooks)."""
    ideal = max(t["gemm"], t["comm"])
    out = {"ideal": ideal, "compute_bound": float(t["gemm"] >= t["comm"])}
    for s in ("chunked", "fused"):
        if s in t:
            out[f"{s}_eta"], out[f"{s}_sol"] = _eta_sol(t["gemm"], t["comm"], t[s])
            out[f"{s}_speedup"] = t["bulk"] / t[s]
    if "gemm_hooked" in t:
        out["fused_gemm_slowdown"] = t["fused_gemm"] / t["gemm_hooked"]
        out["hook_cost"] = t["gemm_hooked"] / t["gemm_triton"]
        out["fused_eta_own"], out["fused_sol_own"] = _eta_sol(t["gemm_hooked"], t["comm"], t["fused"])
    return out


def _eta_sol(gemm: float, comm: float, overlapped: float) -> tuple[float, float]:
    """Overlap efficiency and speed of light of ``overlapped`` against ``gemm`` and ``comm`` alone."""
    return (gemm + comm - overlapped) / min(gemm, comm), max(gemm, comm) / overlapped


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest expected element, over the elements bulk wrote
    (a peer's buffer holds only what it was sent: the rest keeps the poison); NaN where ``got``
    kept the poison there."""
    keep = expected.isfinite()
    if not keep.any():
        return 0.0
    got, expected = got.float()[keep], expected.float()[keep]
    return (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def parse_bytes(text: str) -> int:
    """``4K`` -> 4096, ``16M`` -> 16 MiB, ``1G``, or a plain integer."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in UNITS else ""
    try:
        return int(float(text[: len(text) - len(unit)]) * UNITS[unit])
    except ValueError:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 4096, 4K, 16M, 1G)") from None


def human_bytes(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]} {unit}iB"
    return f"{n} B"


def median_time(fn: Callable[[], Any], device: torch.device, iters: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean seconds per call over ``iters`` calls, after a warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


HEADSTART_LIMIT = 2**27  # cycles: ~70 ms at H100 clocks, more than any shape's enqueueing needs
L2_SCRUB_BYTES = 256 << 20  # several times any GPU's L2 (H100 50 MB, H200 60 MB), as triton's do_bench


# A GPU benchmark's call that has not finished after this long is stuck (a stream wait on a flag
# never raised), not slow: the largest shape's run takes milliseconds.
STUCK_AFTER_S = 60.0


class StuckStream(TimeoutError):
    """Queued GPU work did not finish by its deadline: the stream stays blocked, so nothing more can
    be measured in this process."""


def settle(what: str, seconds: float = STUCK_AFTER_S) -> None:
    """Block until the work queued on the current stream is done, or raise ``StuckStream`` naming
    ``what`` after ``seconds`` (a synchronize would block for good behind a stuck stream wait)."""
    drain_within(torch.device("cuda", torch.cuda.current_device()), seconds, what, StuckStream)


def event_median(run: Callable[[Any, Any], Any], iters: int, *, warmup: int, headstart_cycles: int = 0, what: str = "a timed run") -> float:
    """Median seconds between two CUDA events that ``run(start, end)`` records, over ``iters`` calls
    after ``warmup``, each after the L2 cache is overwritten (a layer's operands are not in it
    when its turn comes). With ``headstart_cycles``, each call is queued behind a sleep kernel that
    long, so the host has enqueued all of it before its start event is reached (GPU time, not
    Python's); a call whose sleep ended before the host had enqueued it all is timed again behind
    a sleep twice as long. Without, each call starts on an idle GPU (launch costs count).
    ``StuckStream`` (naming ``what``) if a call does not finish."""
    def events():
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    scrub = torch.empty(L2_SCRUB_BYTES // 4, dtype=torch.int32, device="cuda")
    for _ in range(warmup):
        run(*events())
    samples = []
    while len(samples) < iters:
        start, end = events()
        scrub.zero_()
        if headstart_cycles:
            torch.cuda._sleep(headstart_cycles)
            slept = torch.cuda.current_stream().record_event()
        else:  # the run starts on an idle GPU: the scrub would give the host a head start of its own
            settle(what)
        run(start, end)
        caught_up = headstart_cycles and slept.query()  # the GPU may have waited for the host inside the timing
        settle(what)
        if caught_up:
            if headstart_cycles >= HEADSTART_LIMIT:  # no head start is enough: the run makes the host wait for the GPU
                raise AssertionError(f"{what}: the GPU caught up with the host even behind a {headstart_cycles}-cycle sleep")
            headstart_cycles *= 2
            continue
        samples.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(samples)


def around(fn: Callable[[], Any]) -> Callable[[Any, Any], None]:
    """``fn`` as a ``run(start, end)`` for ``event_median``: the events recorded around it on the current stream."""
    def run(start, end) -> None:
        start.record()
        fn()
        end.record()

    return run


def timed_samples(group, fn: Callable[[], Any], iters: int, repeats: int = 5) -> list[float]:
    """This rank's mean seconds per call of ``fn`` for each repeat; every repeat starts after a barrier.

    Called on every rank with the same ``iters``: the ranks' timed loops line up.
    """
    fn()
    samples = []
    for _ in range(repeats):
        group.barrier()
        sync(group.device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(group.device)
        samples.append((time.perf_counter() - start) / iters)
    return samples


def slowest_median(per_rank: Sequence[Sequence[float]]) -> float:
    """Median over repeats of the slowest rank's time: a collective step ends with its last rank."""
    return statistics.median(max(repeat) for repeat in zip(*per_rank))


def copy_rate(device: torch.device, nbytes: int) -> float:
    """Bytes read plus bytes written per second by one device-local copy of ``nbytes``: the memory
    traffic ceiling, to divide byte counts that count reads and writes alike."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), device, iters=5)
