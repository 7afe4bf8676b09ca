"""Rendering a schedule for people, and ``--auto``: choosing chunks and microbatches (or decode
batches in flight) that minimise the predicted makespan within a memory budget.

Cost model for ``--auto``: ``batch`` samples split into m microbatches; one forward of a stage
(of S = p v) on a microbatch of b samples takes ``overhead + b * sample_time / S`` (kernel launches
and per-token work); an activation crossing a boundary holds ``b * activation_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .generators import decode, forward
from .ir import Schedule
from .simulate import Costs, Simulation, simulate
from .verify import verify


@dataclass(frozen=True)
class Workload:
    batch: int
    sample_time: float
    overhead: float = 0.0
    activation_bytes: float = 0.0
    latency: float = 0.0
    bandwidth: float = float("inf")
    steps: int = 16
    """Decode: tokens generated per sequence."""


@dataclass
class Candidate:
    chunks: int
    microbatches: int
    schedule: Schedule
    sim: Simulation
    peak_bytes: float


def costs_for(schedule: Schedule, work: Workload, samples: float) -> Costs:
    per_stage = work.overhead + samples * work.sample_time / schedule.stages
    return Costs(forward=per_stage, backward=2 * per_stage, latency=work.latency, bandwidth=work.bandwidth,
                 message_bytes=samples * work.activation_bytes)  # fmt: skip


def auto(kind: str, ranks: int, work: Workload, budget_bytes: float | None, max_chunks: int = 8,
         layers: int | None = None) -> tuple[Candidate, list[Candidate]]:  # fmt: skip
    """The best candidate and every feasible one, fastest first. Decode searches the batches in
    flight (chunks 1); the others search chunks and microbatch counts dividing the batch."""
    candidates = []
    for v, m in _search_space(kind, ranks, work, max_chunks, layers):
        s = decode(ranks, m, work.steps) if kind == "decode" else forward(ranks, m, v)
        verify(s)
        sim = simulate(s, costs_for(s, work, work.batch / m))
        peak = max(sim.peak_memory_bytes.values(), default=0.0)
        if budget_bytes is None or peak <= budget_bytes:
            candidates.append(Candidate(v, m, s, sim, peak))
    if not candidates:
        raise ValueError(f"no schedule fits the memory budget of {budget_bytes:.4g} bytes; raise it or shrink the batch")
    candidates.sort(key=lambda c: (c.sim.makespan, c.chunks, c.microbatches))
    return candidates[0], candidates


def _search_space(kind: str, ranks: int, work: Workload, max_chunks: int, layers: int | None):
    divisors = [m for m in range(1, work.batch + 1) if work.batch % m == 0]
    if kind == "decode":
        return [(1, m) for m in divisors]
    chunk_options = [v for v in (1, 2, 4, 8, 16) if v <= max_chunks and (layers is None or ranks * v <= layers)]
    return [(v, m) for v in chunk_options for m in divisors]


def explain(best: Candidate, candidates: list[Candidate], kind: str, budget_bytes: float | None) -> str:
    """Why ``best`` won: the top candidates and what each alternative loses."""
    what = "batches in flight" if kind == "decode" else "microbatches"
    lines = [f"auto: chose chunks={best.chunks}, {what}={best.microbatches}: predicted makespan {best.sim.makespan * 1e3:.3f} ms, "
             f"worst bubble {max(best.sim.bubble.values()):.1%}, peak {best.peak_bytes / 2**20:.2f} MiB"
             + (f" of a {budget_bytes / 2**20:.2f} MiB budget" if budget_bytes is not None else "")]  # fmt: skip
    lines.append(f"  {'chunks':>6} {what:>18} {'makespan ms':>12} {'bubble':>7} {'peak MiB':>9}  vs best")
    for c in candidates[:6]:
        slower = c.sim.makespan / best.sim.makespan - 1
        lines.append(f"  {c.chunks:>6} {c.microbatches:>18} {c.sim.makespan * 1e3:>12.3f} {max(c.sim.bubble.values()):>7.1%} "
                     f"{c.peak_bytes / 2**20:>9.2f}  {'chosen' if c is best else f'+{slower:.1%}'}")  # fmt: skip
    return "\n".join(lines)


def grid(schedule: Schedule, sim: Simulation, width: int = 100) -> str:
    """Each rank's compute over time, one cell per slot of the shortest action: ``F3`` is
    microbatch 3's forward (``F3b`` on the rank's second chunk), ``.`` idle."""
    compute = [e for e in sim.events if e.lane == "compute"]
    if not compute:
        return "(no compute)"
    slot = min(e.end - e.start for e in compute)
    cells = max(1, round(sim.makespan / slot))
    rows, label_width = [], 0
    for r in range(schedule.ranks):
        row = ["."] * cells
        for e in (e for e in compute if e.rank == r):
            chunk = "" if schedule.chunks == 1 else "abcdefghijklmnop"[e.action.index // schedule.ranks]
            label = f"{e.action.kind}{e.action.microbatch}{chunk}"
            for c in range(round(e.start / slot), round(e.end / slot)):
                row[c] = label
            label_width = max(label_width, len(label))
        rows.append(row)
    shown = max(1, min(cells, width // (label_width + 1)))
    lines = [f"rank {r} | " + " ".join(c.ljust(label_width) for c in row[:shown]) for r, row in enumerate(rows)]
    if shown < cells:
        lines.append(f"... ({cells - shown} more slots of {slot * 1e3:.3g} ms)")
    return "\n".join(lines)


def describe(schedule: Schedule, sim: Simulation) -> str:
    bubbles = ", ".join(f"{b:.1%}" for b in sim.bubble.values())
    peaks = ", ".join(str(n) for n in sim.peak_activations.values())
    return (f"{schedule.kind} schedule: {schedule.ranks} ranks x {schedule.chunks} chunks = {schedule.stages} stages, "
            f"{schedule.microbatches} microbatches" + (f" ({schedule.batches} batches in flight)" if schedule.batches else "") +
            f"\npredicted makespan {sim.makespan * 1e3:.3f} ms; bubble per rank {bubbles}; peak activations per rank {peaks}")  # fmt: skip
