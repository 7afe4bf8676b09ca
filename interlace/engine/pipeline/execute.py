"""Executor: runs one rank's actions of a verified schedule over any Group.

Receives are posted ``lookahead`` actions early (never past a send to the same peer: both sides
must post a pair's transfers in one order) and sends are asynchronous, so stage transfers overlap
compute, on the transport's own thread or stream. A wait that passes its deadline raises
``PipelineTimeoutError`` naming the action it blocked and the rank it expected.

Stages are callables ``stage(x)`` (``stage(x, state)`` in decode rings, with one state per batch
and stage: a KV cache). Training schedules (B actions) run backward through the stages; the last
stage's ``loss(output, m)`` starts it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch

from interlace.engine.comm import CommError, Group
from interlace.engine.comm.signals import FlagTimeoutError

from .generators import dependencies, transfer_boundary
from .ir import Action, Schedule

Shape = Callable[[str, int, int], tuple[tuple[int, ...], torch.dtype]]
"""(payload, microbatch, boundary) -> (shape, dtype) of the message."""


class PipelineCommError(RuntimeError):
    """A transfer failed (a peer failed, or sent what the schedule did not expect); the message
    names this rank's action and the peer."""


class PipelineTimeoutError(PipelineCommError, TimeoutError):
    """A rank stopped waiting for a peer; the message names the action and the peer."""


class Executor:
    """One rank's runner. ``stages`` maps this rank's stage indices to callables."""

    def __init__(self, schedule: Schedule, group: Group, stages: dict[int, Callable], shapes: Shape, *,
                 loss: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                 sample: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 new_state: Callable[[], Any] | None = None, lookahead: int = 2, max_sends: int = 4):  # fmt: skip
        if group.world_size != schedule.ranks:
            raise ValueError(f"the schedule has {schedule.ranks} ranks, the group {group.world_size}")
        mine = {s for s in range(schedule.stages) if schedule.owner(s) == group.rank}
        if set(stages) != mine:
            raise ValueError(f"rank {group.rank} owns stages {sorted(mine)}, got callables for {sorted(stages)}")
        if schedule.batches and (sample is None or new_state is None):
            raise ValueError("a decode ring needs sample(logits) -> token and new_state() -> per-batch state")
        self.schedule, self.group, self.rank, self.stages, self.shapes = schedule, group, group.rank, stages, shapes
        self.loss, self.sample, self.new_state, self.lookahead = loss, sample, new_state, lookahead
        self.max_sends = max_sends  # sends in flight before the oldest is waited for (bounds the memory they pin)
        self.actions = schedule.actions[group.rank]

    def run(self, inputs: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Execute; ``inputs[m]`` feeds stage 0 (prompts of a decode ring's first step). Returns
        the last stage's outputs (decode: sampled tokens) on the rank that owns it."""
        self._inputs, self._values, self._posted = inputs or {}, {}, {}
        self._sends: collections.deque = collections.deque()
        self._states: dict[tuple[int, int], Any] = {}
        results: dict[int, torch.Tensor] = {}
        for i, action in enumerate(self.actions):
            self._post_receives(i)
            verb = {"F": self._forward, "B": self._backward, "W": self._weight, "SEND": self._send, "RECV": self._recv}
            out = verb[action.kind](i, action)
            if out is not None:
                results[action.microbatch] = out
        for i, work in self._sends:
            self._wait(i, work)
        return results

    # --- verbs ------------------------------------------------------------------------------------

    def _recv(self, i: int, a: Action) -> None:
        self._post(i, a)

    def _send(self, i: int, a: Action) -> None:
        tensor = self._values.pop(("out", a.payload, a.microbatch, a.index))
        self._sends.append((i, self.group.send_async(tensor.contiguous(), a.peer)))
        while len(self._sends) > self.max_sends:
            self._wait(*self._sends.popleft())

    def _forward(self, i: int, a: Action) -> torch.Tensor | None:
        x = self._input(i, a)
        training = any(b.kind == "B" for b in self.actions)
        if training:
            x = x.detach().requires_grad_(x.is_floating_point())
        with torch.set_grad_enabled(training):
            y = self._call_stage(a, x)
        if training:
            self._values[("saved", a.microbatch, a.index)] = (x, y)
        return self._emit(a, y.detach() if training else y)

    def _backward(self, i: int, a: Action) -> None:
        x, y = self._values.pop(("saved", a.microbatch, a.index))
        if a.index == self.schedule.stages - 1:
            self.loss(y, a.microbatch).backward()
        else:
            torch.autograd.backward(y, self._take(i, a, "grad"))
        if a.index > 0:
            self._hand_on("grad", a.microbatch, a.index - 1, x.grad, a.index - 1)

    def _weight(self, i: int, a: Action) -> None:
        """Weight gradients are computed with B here; W is reserved for split-backward schedules."""

    # --- helpers ----------------------------------------------------------------------------------

    def _call_stage(self, a: Action, x: torch.Tensor) -> torch.Tensor:
        stage = self.stages[a.index]
        if not self.schedule.batches:
            return stage(x)
        key = (a.microbatch % self.schedule.batches, a.index)
        if key not in self._states:
            self._states[key] = self.new_state()
        return stage(x, self._states[key])

    def _emit(self, a: Action, y: torch.Tensor) -> torch.Tensor | None:
        """Hand the output on (to a SEND or a local consumer); return it if it leaves the pipeline."""
        s, m, last = self.schedule, a.microbatch, self.schedule.stages - 1
        if a.index < last:
            self._hand_on("act", m, a.index, y, a.index + 1)
            return None
        if not s.batches:
            return y
        token = self.sample(y)
        if m + s.batches < s.microbatches:
            self._hand_on("tok", m, last, token, 0)
        return token

    def _hand_on(self, payload: str, m: int, boundary: int, value: torch.Tensor, consumer_stage: int) -> None:
        """Keep a value for the SEND that ships it, or for the local stage that consumes it."""
        where = "out" if self.schedule.owner(consumer_stage) != self.rank else "local"
        self._values[(where, payload, m, boundary)] = value

    def _input(self, i: int, a: Action) -> torch.Tensor:
        deps = dependencies(self.schedule, a)
        if not deps:
            return self._inputs[a.microbatch]
        payload, _ = deps[0]
        return self._take(i, a, payload)

    def _take(self, i: int, a: Action, payload: str) -> torch.Tensor:
        """The input ``a`` needs: from a local stage, or from its (posted) receive."""
        (_, producer), = [d for d in dependencies(self.schedule, a) if d[0] == payload]
        key = (payload, producer.microbatch, transfer_boundary(payload, producer))
        local = self._values.pop(("local", *key), None)
        if local is not None:
            return local
        j, work = self._posted.pop(key)
        return self._wait(i, work, self.actions[j])

    def _post_receives(self, i: int) -> None:
        """Post the receives among the next ``lookahead`` actions, not past a send to their peer."""
        blocked: set[int] = set()
        for j in range(i, min(i + 1 + self.lookahead, len(self.actions))):
            b = self.actions[j]
            if b.kind == "SEND":
                blocked.add(b.peer)
            elif b.kind == "RECV" and b.peer not in blocked:
                self._post(j, b)

    def _post(self, j: int, a: Action) -> None:
        if a.key() in self._posted:
            return
        shape, dtype = self.shapes(a.payload, a.microbatch, a.index)
        buffer = torch.empty(shape, dtype=dtype, device=self.group.device)
        self._posted[a.key()] = (j, self.group.recv_async(buffer, a.peer))

    def _wait(self, i: int, work, awaited: Action | None = None) -> torch.Tensor:
        try:
            return work.wait()
        except (CommError, FlagTimeoutError, TimeoutError) as error:
            blocked = self.actions[i]
            on = f" waiting for `{awaited}` from rank {awaited.peer}" if awaited is not None else ""
            kind = PipelineTimeoutError if isinstance(error, TimeoutError) else PipelineCommError
            raise kind(f"rank {self.rank}: blocked at action #{i} `{blocked}`{on}: {error}") from error
