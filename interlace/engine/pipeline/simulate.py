"""Event-driven simulator: predicted makespan, bubble per rank, peak memory, and a Chrome trace.

Model (the executor's): each rank runs its compute actions in order, one at a time; SEND and
RECV are posted without blocking (transfers overlap compute); a compute action starts when the
rank is free and its input has arrived. A transfer leaves when its SEND is posted, queues behind
earlier transfers on the same directed link, and takes ``latency + bytes / bandwidth``.

With uniform costs and free links it reproduces the closed forms exactly (T: one rank's
forward time per microbatch, its chunks T/v each; training B = 2F):

- GPipe / 1F1B bubble ``(p-1)/(m+p-1)``; interleaved 1F1B ``(p-1)/(v m + p-1)`` (m % p == 0);
- forward-only makespan ``max(m, p) T + (min(m, p) - 1) T / v``, which is ``m T + (p-1) T / v``
  for m >= p and never below ``p T``;
- decode ring utilisation ``min(1, B T / (p T + delta))``, delta the token's trip back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .generators import dependencies, producer_of, transfer_boundary
from .ir import Action, Schedule
from .verify import ScheduleError, peak_activations


@dataclass
class Costs:
    """Per-action costs in seconds (a number, or one per stage) and the links' parameters."""

    forward: float | list[float] = 1.0
    backward: float | list[float] = 2.0
    weight: float | list[float] = 1.0
    latency: float = 0.0
    """Per transfer, any link (seconds)."""
    bandwidth: float = float("inf")
    """Bytes per second of every link."""
    message_bytes: float = 0.0
    """Bytes of one activation, gradient or token message."""
    token_latency: float | None = None
    """The decode ring's return trip (sampling included); defaults to ``latency``."""

    def of(self, action: Action) -> float:
        value = {"F": self.forward, "B": self.backward, "W": self.weight}[action.kind]
        return value[action.index] if isinstance(value, list) else value

    @classmethod
    def uniform(cls, schedule: Schedule, rank_time: float = 1.0, **links) -> Costs:
        """Every stage ``rank_time / chunks`` forward (and twice that backward)."""
        t = rank_time / schedule.chunks
        return cls(forward=t, backward=2 * t, weight=t, **links)


@dataclass
class Event:
    rank: int
    action: Action
    start: float
    end: float
    lane: str  # "compute" or "link a->b"


@dataclass
class Simulation:
    makespan: float
    busy: dict[int, float]
    bubble: dict[int, float]
    peak_activations: dict[int, int]
    peak_memory_bytes: dict[int, float]
    events: list[Event] = field(default_factory=list)

    def trace(self, path: str | Path | None = None) -> dict:
        """Chrome trace (Perfetto loads it): one process per rank, a thread for compute and one
        per outgoing link; times in microseconds."""
        events = [
            {"name": str(e.action), "ph": "X", "pid": e.rank, "tid": e.lane, "ts": e.start * 1e6, "dur": (e.end - e.start) * 1e6,
             "args": {"microbatch": e.action.microbatch, "index": e.action.index}}
            for e in self.events
        ]  # fmt: skip
        meta = [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}} for r in self.busy]
        trace = {"traceEvents": meta + events, "displayTimeUnit": "ms"}
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(trace))
        return trace


def simulate(schedule: Schedule, costs: Costs | None = None) -> Simulation:
    """Predict the run of a (verified) schedule."""
    costs = costs or Costs.uniform(schedule)
    done: dict[Action, float] = {}  # compute action -> end
    arrival: dict[tuple, float] = {}  # transfer key -> arrival
    link_free: dict[tuple[int, int], float] = {}
    clock, pos = [0.0] * schedule.ranks, [0] * schedule.ranks
    events: list[Event] = []
    while _advance(schedule, costs, done, arrival, link_free, clock, pos, events):
        pass
    stuck = [f"rank {r} at #{pos[r]} `{schedule.actions[r][pos[r]]}`" for r in range(schedule.ranks) if pos[r] < len(schedule.actions[r])]
    if stuck:
        raise ScheduleError("the simulation cannot finish (verify the schedule first): " + "; ".join(stuck))
    makespan = max((e.end for e in events), default=0.0)
    busy = {r: sum(e.end - e.start for e in events if e.rank == r and e.lane == "compute") for r in range(schedule.ranks)}
    peaks = peak_activations(schedule)
    return Simulation(
        makespan=makespan,
        busy=busy,
        bubble={r: 1 - b / makespan if makespan else 0.0 for r, b in busy.items()},
        peak_activations=peaks,
        peak_memory_bytes={r: n * costs.message_bytes for r, n in peaks.items()},
        events=events,
    )


def _advance(schedule, costs, done, arrival, link_free, clock, pos, events) -> bool:
    """One pass over the ranks, running every action whose inputs are known; True on progress."""
    progress = False
    for r, acts in enumerate(schedule.actions):
        while pos[r] < len(acts):
            a = acts[pos[r]]
            if a.kind == "RECV":
                pos[r] += 1  # posted early; the compute that needs it waits for the arrival
            elif a.kind == "SEND":
                producer = producer_of(a)
                if producer not in done:
                    break
                _transfer(schedule, costs, a, r, max(done[producer], clock[r]), arrival, link_free, events)
                pos[r] += 1
            else:
                ready = _input_ready(schedule, costs, a, r, done, arrival)
                if ready is None:
                    break
                start = max(clock[r], ready)
                done[a] = clock[r] = start + costs.of(a)
                events.append(Event(r, a, start, clock[r], "compute"))
                pos[r] += 1
            progress = True
    return progress


def _input_ready(schedule: Schedule, costs: Costs, a: Action, r: int, done: dict, arrival: dict) -> float | None:
    """When the action's input is there, or None if not yet known. A decode token pays the
    ring's return trip (sampling included) even when it stays on one rank."""
    ready = 0.0
    for payload, producer in dependencies(schedule, a):
        if payload == "local" or schedule.owner(producer.index) == r:
            at = done.get(producer)
            if at is not None and payload == "tok":
                at += costs.token_latency if costs.token_latency is not None else costs.latency
        else:
            at = arrival.get((payload, producer.microbatch, transfer_boundary(payload, producer)))
        if at is None:
            return None
        ready = max(ready, at)
    return ready


def _transfer(schedule, costs, a: Action, r: int, posted: float, arrival: dict, link_free: dict, events: list) -> None:
    link = (r, a.peer)
    start = max(posted, link_free.get(link, 0.0))
    wire = costs.message_bytes / costs.bandwidth if costs.message_bytes else 0.0
    latency = costs.token_latency if a.payload == "tok" and costs.token_latency is not None else costs.latency
    link_free[link] = start + wire
    arrival[a.key()] = start + wire + latency
    events.append(Event(r, a, start, start + wire + latency, f"link {r}->{a.peer}"))


def decode_cycle(sim: Simulation, schedule: Schedule) -> float:
    """Decode rings: the steady-state time from one step of a batch on stage 0 to its next step
    (``F m`` to ``F m+B``), taken at the end of the run."""
    starts = {e.action.microbatch: e.start for e in sim.events if e.lane == "compute" and e.action.index == 0}
    m = schedule.microbatches - 1 - schedule.batches
    return starts[m + schedule.batches] - starts[m]
