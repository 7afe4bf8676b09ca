"""Verifier: a schedule runs only if it is proven to run.

Checks, in order, each failure a ``ScheduleError`` naming the rank, the action and the reason:

1. shape: ranks, stage ownership, microbatch and stage ranges;
2. coverage: every microbatch passes every stage exactly once in order (F on the stage's owner;
   B exactly once per F in training schedules);
3. pairing: every SEND has its RECV and vice versa, with matching peers;
4. per-peer order: for each pair of ranks, both post their transfers in the same order (NCCL
   matches a pair's operations in posting order);
5. data before use: a compute action comes after the RECV (or local producer) of its input;
6. no deadlock: the ranks are stepped under strict rendezvous semantics (a SEND completes only
   when its RECV is reached), the most restrictive transport; if that finishes, any will;
7. memory: peak in-flight activation buffers per rank within ``budget`` (see ``peak_activations``).
"""

from __future__ import annotations

from collections import defaultdict

from .generators import dependencies, producer_of, transfer_boundary
from .ir import COMPUTE, Action, Schedule


class ScheduleError(ValueError):
    """A schedule that cannot run correctly; the message says where and why."""


def verify(schedule: Schedule, *, budget: int | None = None) -> dict[int, int]:
    """Raise ``ScheduleError`` unless every check passes; return peak activations per rank."""
    _check_shape(schedule)
    _check_coverage(schedule)
    _check_pairing(schedule)
    _check_peer_order(schedule)
    _check_data_before_use(schedule)
    _check_no_deadlock(schedule)
    peaks = peak_activations(schedule)
    if budget is not None:
        for r, peak in peaks.items():
            if peak > budget:
                raise ScheduleError(f"rank {r}: holds {peak} activation buffers at its peak; the budget is {budget}")
    return peaks


def peak_activations(schedule: Schedule) -> dict[int, int]:
    """Peak live activation buffers per rank, walking its actions in order.

    Training: each F keeps its activation until its B (the in-flight microbatches). Inference: a
    received input lives from its RECV to the F that uses it, an output from its F to its SEND
    (or to the local F that uses it); the last stage's output leaves the pipeline.
    """
    training = any(a.kind == "B" for acts in schedule.actions for a in acts)
    peaks = {}
    for r, acts in enumerate(schedule.actions):
        live = peak = 0
        for a in acts:
            live += _live_delta(schedule, a, training)
            peak = max(peak, live)
        peaks[r] = peak
    return peaks


def _live_delta(s: Schedule, a: Action, training: bool) -> int:
    if training:
        return {"F": 1, "B": -1}.get(a.kind, 0)
    if a.kind in ("RECV", "SEND"):
        return 1 if a.kind == "RECV" else -1
    if a.kind != "F":
        return 0
    has_input = a.index > 0 or (s.batches and a.microbatch >= s.batches)
    keeps_output = a.index < s.stages - 1 or bool(s.batches)
    return int(keeps_output) - int(bool(has_input))


def _fail(rank: int, index: int, action: Action | str, reason: str) -> None:
    raise ScheduleError(f"rank {rank}, action #{index} `{action}`: {reason}")


def _check_shape(s: Schedule) -> None:
    if len(s.actions) != s.ranks:
        raise ScheduleError(f"schedule has {len(s.actions)} rank lists for {s.ranks} ranks")
    for r, acts in enumerate(s.actions):
        for i, a in enumerate(acts):
            if not 0 <= a.microbatch < s.microbatches:
                _fail(r, i, a, f"microbatch {a.microbatch} outside [0, {s.microbatches})")
            if not 0 <= a.index < s.stages:
                _fail(r, i, a, f"{'stage' if a.kind in COMPUTE else 'boundary'} {a.index} outside [0, {s.stages})")
            if a.kind in COMPUTE and s.owner(a.index) != r:
                _fail(r, i, a, f"stage {a.index} belongs to rank {s.owner(a.index)}")
            if a.kind not in COMPUTE and not (0 <= a.peer < s.ranks and a.peer != r):
                _fail(r, i, a, f"peer {a.peer} is not another rank of {s.ranks}")


def _check_coverage(s: Schedule) -> None:
    seen: dict[Action, tuple[int, int]] = {}
    for r, acts in enumerate(s.actions):
        for i, a in enumerate(acts):
            if a.kind in COMPUTE:
                if a in seen:
                    _fail(r, i, a, f"duplicates action #{seen[a][1]} on rank {seen[a][0]}: microbatch {a.microbatch} "
                                   f"would pass stage {a.index} twice")  # fmt: skip
                seen[a] = (r, i)
    kinds = {a.kind for a in seen}
    for m in range(s.microbatches):
        for st in range(s.stages):
            for kind in ("F",) + (("B",) if "B" in kinds else ()):
                if Action(kind, m, st) not in seen:
                    raise ScheduleError(f"rank {s.owner(st)}: no `{kind} m={m} s={st}`: microbatch {m} never passes stage {st}"
                                        + (" backward" if kind == "B" else ""))  # fmt: skip


def _check_pairing(s: Schedule) -> None:
    sends, recvs = defaultdict(list), defaultdict(list)
    for r, acts in enumerate(s.actions):
        for i, a in enumerate(acts):
            if a.kind == "SEND":
                sends[a.key()].append((r, i, a))
            elif a.kind == "RECV":
                recvs[a.key()].append((r, i, a))
    for key in sends.keys() | recvs.keys():
        out, into = sends.get(key, []), recvs.get(key, [])
        for group, role in ((out, "SEND"), (into, "RECV")):
            if len(group) > 1:
                (r, i, a), (r2, i2, _) = group[:2]
                _fail(r, i, a, f"the same {role} also stands at rank {r2} action #{i2}")
        if out and not into:
            r, i, a = out[0]
            _fail(r, i, a, f"no rank receives it (rank {a.peer} has no `RECV {a.payload} m={a.microbatch} b={a.index} from={r}`)")
        if into and not out:
            r, i, a = into[0]
            _fail(r, i, a, f"rank {a.peer} never sends it: it would wait forever")
        (sr, si, sa), (rr, ri, ra) = out[0], into[0]
        if sa.peer != rr or ra.peer != sr:
            _fail(rr, ri, ra, f"pairs with rank {sr}'s action #{si} `{sa}`, whose peers disagree")


def _check_peer_order(s: Schedule) -> None:
    for a_rank in range(s.ranks):
        for b_rank in range(a_rank + 1, s.ranks):
            seq_a = [(i, t) for i, t in enumerate(s.actions[a_rank]) if t.kind not in COMPUTE and t.peer == b_rank]
            seq_b = [(i, t) for i, t in enumerate(s.actions[b_rank]) if t.kind not in COMPUTE and t.peer == a_rank]
            for (ia, ta), (ib, tb) in zip(seq_a, seq_b):
                if ta.key() != tb.key():
                    _fail(b_rank, ib, tb, f"per-peer order differs: rank {a_rank} posts `{ta}` (action #{ia}) at this point "
                                          f"of its transfers with rank {b_rank}; both sides must post in one order")  # fmt: skip


def _check_data_before_use(s: Schedule) -> None:
    for r, acts in enumerate(s.actions):
        have: set = set()
        for i, a in enumerate(acts):
            if a.kind == "RECV":
                have.add(a.key())
            elif a.kind in COMPUTE:
                for payload, producer in dependencies(s, a):
                    if payload != "local" and s.owner(producer.index) != r:
                        key = (payload, producer.microbatch, transfer_boundary(payload, producer))
                        if key not in have:
                            _fail(r, i, a, f"its input `{payload} m={key[1]} b={key[2]}` from rank {s.owner(producer.index)} "
                                           f"is not received before it")  # fmt: skip
                    elif producer not in have:
                        _fail(r, i, a, f"runs before `{producer}`, which produces its input on this rank")
                have.add(a)
            elif producer_of(a) not in have:
                _fail(r, i, a, "sends data this rank has not produced yet")


def _check_no_deadlock(s: Schedule) -> None:
    """Step all ranks; a SEND and its RECV complete together (rendezvous)."""
    pos = [0] * s.ranks
    while True:
        progress = False
        for r, acts in enumerate(s.actions):
            while pos[r] < len(acts):
                a = acts[pos[r]]
                if a.kind in COMPUTE:
                    pos[r] += 1
                    progress = True
                    continue
                peer_next = s.actions[a.peer][pos[a.peer]] if pos[a.peer] < len(s.actions[a.peer]) else None
                if peer_next is None or peer_next.kind == a.kind or peer_next.kind in COMPUTE or peer_next.key() != a.key():
                    break
                pos[r] += 1
                pos[a.peer] += 1
                progress = True
        if all(p == len(acts) for p, acts in zip(pos, s.actions)):
            return
        if not progress:
            stuck = [(r, pos[r], s.actions[r][pos[r]]) for r in range(s.ranks) if pos[r] < len(s.actions[r])]
            r, i, a = stuck[0]
            others = "; ".join(f"rank {q} waits at #{j} `{b}` for rank {b.peer}" for q, j, b in stuck[1:])
            _fail(r, i, a, f"deadlock: waits for rank {a.peer}" + (f"; {others}" if others else ""))
