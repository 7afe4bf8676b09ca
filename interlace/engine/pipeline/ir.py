"""Schedule IR: per-rank ordered actions, printable and loadable as text.

A model is cut into ``S = ranks * chunks`` stages; stage ``s`` lives on rank ``s % ranks``
(looped placement: rank r holds stages r, r + p, r + 2p, ...). Actions:

- ``F m=3 s=5``: forward of microbatch 3 on stage 5 (``B`` backward, ``W`` weight gradient:
  reserved for training schedules);
- ``SEND act m=3 b=5 to=2`` / ``RECV act m=3 b=5 from=1``: the activation of microbatch 3 across
  boundary 5, i.e. from stage 5 to stage 6. ``grad`` goes the other way (stage 6 to stage 5);
  ``tok`` carries a decode step's sampled token from the last stage back to stage 0.

Decode rings number microbatches ``m = step * batches + batch``: batch b's step n+1 needs the
token of microbatch ``m - batches``.

Text form: a header line, then one line per rank, actions separated by `` | ``::

    # interlace schedule kind=gpipe ranks=2 chunks=1 microbatches=2 batches=0
    rank 0: F m=0 s=0 | SEND act m=0 b=0 to=1 | F m=1 s=0 | SEND act m=1 b=0 to=1
    rank 1: RECV act m=0 b=0 from=0 | RECV act m=1 b=0 from=0 | F m=0 s=1 | F m=1 s=1
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

COMPUTE = ("F", "B", "W")
TRANSFER = ("SEND", "RECV")
PAYLOADS = ("act", "grad", "tok")
_COMPUTE_RE = re.compile(r"^(F|B|W) m=(\d+) s=(\d+)$")
_TRANSFER_RE = re.compile(r"^(SEND|RECV) (act|grad|tok) m=(\d+) b=(\d+) (to|from)=(\d+)$")
_HEADER_RE = re.compile(r"^# interlace schedule kind=(\S+) ranks=(\d+) chunks=(\d+) microbatches=(\d+) batches=(\d+)$")


@dataclass(frozen=True, slots=True)
class Action:
    kind: str
    microbatch: int
    index: int
    """F/B/W: the stage; SEND/RECV: the boundary."""
    payload: str | None = None
    peer: int | None = None

    def __str__(self) -> str:
        if self.kind in COMPUTE:
            return f"{self.kind} m={self.microbatch} s={self.index}"
        direction = "to" if self.kind == "SEND" else "from"
        return f"{self.kind} {self.payload} m={self.microbatch} b={self.index} {direction}={self.peer}"

    @classmethod
    def parse(cls, text: str) -> Action:
        text = text.strip()
        if match := _COMPUTE_RE.match(text):
            return cls(match[1], int(match[2]), int(match[3]))
        if match := _TRANSFER_RE.match(text):
            if (match[1] == "SEND") != (match[5] == "to"):
                raise ValueError(f"not an action: {text!r} (SEND takes to=, RECV takes from=)")
            return cls(match[1], int(match[3]), int(match[4]), match[2], int(match[6]))
        raise ValueError(f"not an action: {text!r}; expected e.g. 'F m=0 s=1' or 'SEND act m=0 b=0 to=1'")

    def key(self) -> tuple:
        """What a SEND and its RECV share."""
        return self.payload, self.microbatch, self.index


def compute(kind: str, m: int, stage: int) -> Action:
    return Action(kind, m, stage)


def send(payload: str, m: int, boundary: int, to: int) -> Action:
    return Action("SEND", m, boundary, payload, to)


def recv(payload: str, m: int, boundary: int, src: int) -> Action:
    return Action("RECV", m, boundary, payload, src)


@dataclass
class Schedule:
    """Per-rank action lists plus the shape of the problem they solve."""

    kind: str
    ranks: int
    chunks: int
    microbatches: int
    batches: int = 0
    """Decode rings: batches in flight (microbatch m's token feeds m + batches); 0 otherwise."""
    actions: list[list[Action]] = field(default_factory=list)

    @property
    def stages(self) -> int:
        return self.ranks * self.chunks

    def owner(self, stage: int) -> int:
        return stage % self.ranks

    def __str__(self) -> str:
        head = (f"# interlace schedule kind={self.kind} ranks={self.ranks} chunks={self.chunks} "
                f"microbatches={self.microbatches} batches={self.batches}")  # fmt: skip
        return "\n".join([head] + [f"rank {r}: " + " | ".join(map(str, acts)) for r, acts in enumerate(self.actions)]) + "\n"

    @classmethod
    def parse(cls, text: str) -> Schedule:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        match = _HEADER_RE.match(lines[0].strip()) if lines else None
        if not match:
            raise ValueError("a schedule starts with '# interlace schedule kind=... ranks=... chunks=... microbatches=... batches=...'")
        schedule = cls(match[1], int(match[2]), int(match[3]), int(match[4]), int(match[5]))
        for r, line in enumerate(lines[1:]):
            prefix = f"rank {r}:"
            if not line.startswith(prefix):
                raise ValueError(f"line {r + 2}: expected it to start with {prefix!r}, got {line[:20]!r}")
            body = line[len(prefix) :].strip()
            schedule.actions.append([Action.parse(a) for a in body.split("|")] if body else [])
        if len(schedule.actions) != schedule.ranks:
            raise ValueError(f"the header says {schedule.ranks} ranks but {len(schedule.actions)} rank lines follow")
        return schedule
