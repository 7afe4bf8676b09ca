"""Schedule generators. Each decides every rank's compute order; ``_place_transfers`` adds the sends
and receives.

Transfers are placed by running the compute orders on unit costs (F 1, B 2, W 1) and stamping
every SEND with its producer's end and its RECV with the same instant. Every rank's list is then
sorted by those stamps, so both ends of each pair see their transfers in one order (what NCCL's
per-pair streams need), one global order exists (no rendezvous can deadlock), and each receive
comes as early as its data exists ("posting receives early").
"""

from __future__ import annotations

from collections.abc import Iterator

from .ir import Action, Schedule, compute, recv, send

UNIT_COST = {"F": 1.0, "B": 2.0, "W": 1.0}
KINDS = ("gpipe", "1f1b", "interleaved", "forward", "decode")


def gpipe(ranks: int, microbatches: int, *, training: bool = True) -> Schedule:
    """All forwards, then (training) all backwards in microbatch order."""
    _check(ranks, microbatches, 1)
    orders = [[compute("F", m, r) for m in range(microbatches)] for r in range(ranks)]
    if training:
        for r in range(ranks):
            orders[r] += [compute("B", m, r) for m in range(microbatches)]
    return _place_transfers(Schedule("gpipe", ranks, 1, microbatches), orders)


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """1F1B (training): rank r warms up with p-r-1 forwards, then alternates, then drains."""
    return interleaved(ranks, microbatches, 1, kind="1f1b")


def interleaved(ranks: int, microbatches: int, chunks: int, *, group_size: int | None = None, kind: str = "interleaved") -> Schedule:
    """Interleaved 1F1B (training) with ``chunks`` stages per rank.

    Virtual microbatches run in groups of ``group_size`` (default: ranks) microbatches: a group
    visits chunk 0 for all its microbatches, then chunk 1, ... Backwards walk the chunks in
    reverse. Rank r warms up with ``2(p-r-1) + (v-1) g`` forwards (Megatron's rule for g = p).
    """
    group = group_size or ranks
    _check(ranks, microbatches, chunks, group)
    if chunks > 1 and microbatches % group:
        raise ValueError(f"interleaved 1F1B needs microbatches ({microbatches}) divisible by the group size ({group}): "
                         f"a partial last group breaks its warm-up count (use group_size={microbatches} or the forward-only kind)")  # fmt: skip
    orders = []
    for r in range(ranks):
        fwd = [compute("F", m, j * ranks + r) for m, j in _virtual(microbatches, chunks, group)]
        bwd = [compute("B", m, (chunks - 1 - j) * ranks + r) for m, j in _virtual(microbatches, chunks, group)]
        warmup = min(len(fwd), 2 * (ranks - r - 1) + (chunks - 1) * group) if chunks > 1 else min(len(fwd), ranks - r - 1)
        order = fwd[:warmup]
        for i in range(len(fwd) - warmup):
            order += [fwd[warmup + i], bwd[i]]
        orders.append(order + bwd[len(fwd) - warmup :])
    return _place_transfers(Schedule(kind, ranks, chunks, microbatches), orders)


def forward(ranks: int, microbatches: int, chunks: int = 1, *, group_size: int | None = None) -> Schedule:
    """Forward-only interleaved (inference): the forward order of ``interleaved``, no backward, any m.
    Makespan ``max(m, p) T + (min(m, p) - 1) T / v`` for uniform stages (T per rank per microbatch)."""
    group = group_size or ranks
    _check(ranks, microbatches, chunks, group)
    orders = [[compute("F", m, j * ranks + r) for m, j in _virtual(microbatches, chunks, group)] for r in range(ranks)]
    return _place_transfers(Schedule("forward", ranks, chunks, microbatches), orders)


def decode(ranks: int, batches: int, steps: int) -> Schedule:
    """The steady-state decode ring: ``batches`` batches in flight, ``steps`` tokens each.

    Microbatch ``m = step * batches + batch``; the last stage's token of m feeds stage 0 of
    ``m + batches``. Utilisation ``min(1, B T / (p T + delta))`` (delta: the ring's latency).
    """
    _check(ranks, batches * steps, 1)
    orders = [[compute("F", m, r) for m in range(batches * steps)] for r in range(ranks)]
    return _place_transfers(Schedule("decode", ranks, 1, batches * steps, batches), orders)


# The options each applies to; given to another kind, an option is refused, not ignored.
TAKES = {"chunks": ("interleaved", "forward"), "group_size": ("interleaved", "forward"),
         "training": ("gpipe", "1f1b", "interleaved"), "batches": ("decode",)}  # fmt: skip


def generate(kind: str, ranks: int, microbatches: int, chunks: int = 1, *, group_size: int | None = None,
             training: bool = False, batches: int | None = None) -> Schedule:  # fmt: skip
    """By name, for the CLI: ``decode`` reads ``microbatches`` as decode steps per batch, and
    ``batches`` (default 1) as the batches in flight."""
    if kind not in KINDS:
        raise ValueError(f"schedule kind must be one of {KINDS}, got {kind!r}")
    given = {"chunks": chunks, "group_size": group_size, "training": training, "batches": batches}
    unset = {"chunks": 1, "group_size": None, "training": False, "batches": None}
    for option, value in given.items():
        if value != unset[option] and kind not in TAKES[option]:
            raise ValueError(f"schedule kind {kind!r} does not take {option} (it is for {', '.join(TAKES[option])}), got {option}={value!r}")
    if kind == "gpipe":
        return gpipe(ranks, microbatches, training=training)
    if kind == "1f1b":
        return one_f_one_b(ranks, microbatches) if training else gpipe(ranks, microbatches, training=False)
    if kind == "interleaved":
        return interleaved(ranks, microbatches, chunks, group_size=group_size) if training else forward(ranks, microbatches, chunks, group_size=group_size)
    if kind == "forward":
        return forward(ranks, microbatches, chunks, group_size=group_size)
    return decode(ranks, 1 if batches is None else batches, microbatches)


def dependencies(schedule: Schedule, action: Action) -> list[tuple[str, Action]]:
    """(payload, producer) pairs a compute action needs; the payload names the transfer when
    the producer lives on another rank."""
    m, s, last = action.microbatch, action.index, schedule.stages - 1
    if action.kind == "F":
        if s > 0:
            return [("act", compute("F", m, s - 1))]
        if schedule.batches and m >= schedule.batches:
            return [("tok", compute("F", m - schedule.batches, last))]
        return []
    if action.kind == "B":
        return [("grad", compute("B", m, s + 1))] if s < last else [("local", compute("F", m, s))]
    return [("local", compute("B", m, s))]


def transfer_boundary(payload: str, producer: Action) -> int:
    """The boundary index a transfer carries: act b=s (s -> s+1), grad b=s-1 (s -> s-1), tok b=last."""
    return producer.index - 1 if payload == "grad" else producer.index


def producer_of(transfer: Action) -> Action:
    """The compute action whose output a SEND/RECV carries (act, tok: F of stage b; grad: B of b+1)."""
    if transfer.payload == "grad":
        return Action("B", transfer.microbatch, transfer.index + 1)
    return Action("F", transfer.microbatch, transfer.index)


def _virtual(microbatches: int, chunks: int, group: int) -> Iterator[tuple[int, int]]:
    """(microbatch, local chunk) in forward order: each group of microbatches visits chunk 0,
    then chunk 1, ... Groups hold ``group`` microbatches and the last one also takes the
    remainder: a group smaller than the ring would finish a chunk before its first microbatch
    came back around, and stall (p=2, v=2, m=3: 4.0 T instead of 3.5 T)."""
    count = max(1, microbatches // group)
    edges = [i * group for i in range(count)] + [microbatches]
    for start, end in zip(edges, edges[1:]):
        for j in range(chunks):
            for m in range(start, end):
                yield m, j


def _place_transfers(schedule: Schedule, orders: list[list[Action]]) -> Schedule:
    times = _unit_times(schedule, orders)
    owner = schedule.owner
    stamped: list[list[tuple]] = [[] for _ in orders]
    for r, order in enumerate(orders):
        for a in order:
            stamped[r].append(((times[a][0], 1, 0, str(a)), a))
            for payload, producer in dependencies(schedule, a):
                src = owner(producer.index)
                if payload == "local" or src == r:
                    continue
                b, at = transfer_boundary(payload, producer), times[producer][1]
                tie = (at, 0, ("act", "grad", "tok").index(payload), f"{producer.microbatch}:{b}")
                stamped[r].append((tie, recv(payload, producer.microbatch, b, src)))
                stamped[src].append((tie, send(payload, producer.microbatch, b, r)))
    schedule.actions = [[a for _, a in sorted(items, key=lambda item: item[0])] for items in stamped]
    return schedule


def _unit_times(schedule: Schedule, orders: list[list[Action]]) -> dict[Action, tuple[float, float]]:
    """Start and end of every compute action under unit costs, zero-latency transfers."""
    times: dict[Action, tuple[float, float]] = {}
    pos, clock = [0] * len(orders), [0.0] * len(orders)
    progress = True
    while progress:
        progress = False
        for r, order in enumerate(orders):
            while pos[r] < len(order):
                a = order[pos[r]]
                needs = [p for _, p in dependencies(schedule, a)]
                if any(p not in times for p in needs):
                    break
                start = max([clock[r]] + [times[p][1] for p in needs])
                times[a] = (start, start + UNIT_COST[a.kind])
                clock[r], pos[r], progress = times[a][1], pos[r] + 1, True
    if any(p < len(o) for p, o in zip(pos, orders)):
        stuck = [f"rank {r} at {orders[r][pos[r]]}" for r in range(len(orders)) if pos[r] < len(orders[r])]
        raise RuntimeError(f"generator produced a compute order that cannot run: {'; '.join(stuck)}")
    return times


def _check(ranks: int, microbatches: int, chunks: int, group: int | None = None) -> None:
    for name, value in (("ranks", ranks), ("microbatches", microbatches), ("chunks", chunks), ("group_size", group or 1)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if group is not None and chunks > 1 and group < ranks:
        raise ValueError(f"group_size={group} must be >= ranks={ranks}: a smaller group stalls between chunks")
