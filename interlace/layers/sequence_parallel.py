"""Sequence parallelism for Llama-style stacks, as forward hooks (module names stay stock).

Between attention and MLP blocks each rank keeps only its rows of the token stream,
``x_shard_m [n, H]`` with ``n = ceil(B*S / W)`` (tokens padded with zero rows to a multiple of the
world size, so odd counts and single-token decode steps work). The model's own bookkeeping
(positions, masks, KV cache) still sees ``[B, S, H]``:

- the first decoder layer's input (replicated ``[B, S, H]``) is cut to this rank's rows;
- each attention block gathers its input back to ``[B, S, H]`` (its q/k/v projections and the
  attention need whole sequences), and its o_proj reduce-scatters (GEMM+RS);
- each MLP gathers inside its gate/up GEMM (AG+GEMM) and reduce-scatters in down_proj;
- the final norm's output is gathered back to ``[B, S, H]`` for the LM head.
"""

from __future__ import annotations

import math

import torch

from interlace.engine.comm import Group
from interlace.engine.overlap import autograd as tp

from .linear import pad_rows


class SequenceParallel:
    """Token sharding shared by one model's hooks; remembers the ``[B, S]`` of the current call."""

    def __init__(self, group: Group):
        self.group = group
        self.shape: torch.Size | None = None

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated ``[B, S, H]`` -> this rank's rows ``[n, H]``."""
        self.shape = x.shape[:-1]
        return tp.shard_rows(pad_rows(x.reshape(-1, x.shape[-1]), self.group.world_size), self.group)

    def gather(self, x_shard_m: torch.Tensor) -> torch.Tensor:
        """This rank's rows ``[n, H]`` -> ``[B, S, H]`` on every rank."""
        if self.shape is None:
            raise RuntimeError("sequence-parallel gather before any shard: the first decoder layer did not run")
        full = tp.gather_rows(x_shard_m, self.group)
        return full[: math.prod(self.shape)].view(*self.shape, full.shape[-1])

    def shard_input(self, module, args, kwargs):
        return _replace_hidden(args, kwargs, self.shard)

    def gather_input(self, module, args, kwargs):
        return _replace_hidden(args, kwargs, self.gather)

    def gather_output(self, module, args, output):
        return self.gather(output)


def _replace_hidden(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """Apply ``fn`` to the ``hidden_states`` argument, positional or keyword."""
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return (fn(args[0]), *args[1:]), kwargs
