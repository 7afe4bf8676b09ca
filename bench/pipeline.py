"""Pipeline benchmark: measured against predicted makespan and bubble, per schedule.

Stages sleep for their cost: the measurement then isolates what the engine adds (the executor,
the transport's latency, thread hand-offs) from compute noise, and means the same on 2 CPU cores
as on a GPU node. Every schedule runs on real rank threads (LocalGroup) through the executor;
the prediction is the simulator's for the same costs. ``bubble`` is a rank's idle fraction of
the makespan (measured: 1 - sleeping time / makespan), the worst rank reported.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from interlace.engine.comm import spawn
from interlace.engine.pipeline import Costs, Executor, generate, simulate, verify

from .common import report_table

CASES = [("gpipe", 1, 0), ("forward", 1, 0), ("forward", 2, 0), ("forward", 4, 0), ("decode", 1, 2), ("decode", 1, 4)]


@dataclass
class Config:
    ranks: int = 4
    microbatches: int = 8
    rank_time: float = 0.02
    """One rank's stage time per microbatch, seconds (split over its chunks)."""
    cases: list = field(default_factory=lambda: [list(c) for c in CASES])


def _sleeper(seconds: float, busy: list):
    def stage(x, state=None):
        start = time.monotonic()
        time.sleep(seconds)
        busy.append(time.monotonic() - start)
        return x + 1

    return stage


def schedule(kind: str, ranks: int, microbatches: int, chunks: int, batches: int):
    """A case's schedule: decode (``batches`` in flight) generates as many tokens in all as the
    others have microbatches."""
    if kind == "decode":
        return generate(kind, ranks, max(1, microbatches // batches), chunks, batches=batches)
    return generate(kind, ranks, microbatches, chunks)


def measure_rank(group, kind: str, microbatches: int, chunks: int, batches: int, rank_time: float) -> tuple[float, float, float]:
    s = schedule(kind, group.world_size, microbatches, chunks, batches)
    verify(s)
    busy: list[float] = []
    stages = {i: _sleeper(rank_time / chunks, busy) for i in range(s.stages) if s.owner(i) == group.rank}
    runner = Executor(s, group, stages, lambda *_: ((1,), torch.float32), sample=lambda y: y, new_state=lambda: None)
    inputs = {m: torch.zeros(1) for m in range(batches or s.microbatches)}
    group.barrier()
    start = time.monotonic()
    runner.run(inputs)
    return start, time.monotonic(), sum(busy)


def run(config: Config) -> dict:
    rows = []
    for kind, chunks, batches in config.cases:
        print(f"  {kind} chunks={chunks} batches={batches}", file=sys.stderr, flush=True)
        per_rank = spawn(measure_rank, config.ranks, "local", timeout=120,
                         args=(kind, config.microbatches, chunks, batches, config.rank_time))  # fmt: skip
        measured = max(end for _, end, _ in per_rank) - min(start for start, _, _ in per_rank)
        s = schedule(kind, config.ranks, config.microbatches, chunks, batches)
        sim = simulate(s, Costs.uniform(s, config.rank_time))
        rows.append({
            "kind": kind, "ranks": config.ranks, "microbatches": s.microbatches, "chunks": chunks, "batches": batches,
            "predicted_ms": sim.makespan * 1e3, "measured_ms": measured * 1e3, "error": measured / sim.makespan - 1,
            "predicted_bubble": max(sim.bubble.values()), "measured_bubble": max(1 - b / measured for _, _, b in per_rank),
        })  # fmt: skip
    return {"rows": rows, "skipped": [], "config": asdict(config)}


COLUMNS = [
    ("kind", "schedule", ""), ("ranks", "p", ""), ("chunks", "v", ""), ("batches", "B", ""), ("microbatches", "m", ""),
    ("predicted_ms", "predicted ms", ".1f"), ("measured_ms", "measured ms", ".1f"), ("error", "error", "+.1%"),
    ("predicted_bubble", "bubble pred", ".1%"), ("measured_bubble", "bubble meas", ".1%"),
]  # fmt: skip


def table(result: dict) -> str:
    c = result["config"]
    head = (f"pipeline: sleep-based stages ({c['rank_time'] * 1e3:.0f} ms per rank per microbatch), rank threads "
            f"(LocalGroup) through the executor; predicted = simulator, same costs")  # fmt: skip
    return report_table(head, result, COLUMNS)
