"""Flags written and awaited at a device-side epoch value: what a captured CUDA graph can replay.

``EpochValue(epoch, scale, offset)`` stands for ``epoch * scale + offset`` where ``epoch`` is a
1-element int32 tensor: the kernels of ``interlace.kernels.flags`` read it when they run, a host
reads it with ``resolve()``. Stream memory operations (``interlace.engine.comm.signals``) are the
eager alternative: no kernel, but the value is fixed when the operation is enqueued.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from interlace.kernels import flags as kernel
from interlace.ops.describe import describe
from interlace.ops.gemm import FIRST_LAUNCHES, launching, patience


@dataclass(frozen=True, eq=False)
class EpochValue:
    epoch: torch.Tensor
    scale: int = 1
    offset: int = 0

    def __post_init__(self):
        if self.epoch.dtype != torch.int32 or self.epoch.numel() != 1:
            raise ValueError(f"EpochValue needs a 1-element int32 epoch tensor, got {describe(self.epoch)}")

    def resolve(self) -> int:
        """The value now, read by the host (synchronises a GPU epoch)."""
        return int(self.epoch.item()) * self.scale + self.offset


def write(flags: torch.Tensor, index: int, value: EpochValue, status: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
    """``flags[index] = value`` (release, system scope), from a kernel on ``stream``; nothing once
    ``status`` records a failure."""
    _launch(flags, index, value, stream, status, 0, 0, wait=False)


def wait(flags: torch.Tensor, index: int, value: EpochValue, status: torch.Tensor, wait_id: int, timeout: float,
         stream: torch.cuda.Stream | None = None) -> None:  # fmt: skip
    """Order ``stream`` after ``flags[index] >= value`` with a spinning one-thread kernel; after
    ``timeout`` seconds it records ``[2, wait_id, value, observed]`` in ``status`` and gives up."""
    _launch(flags, index, value, stream, status, wait_id, patience(timeout), wait=True)


def _launch(flags, index, value, stream, status, wait_id, bound, *, wait: bool) -> None:
    if flags.dtype != torch.int32 or flags.dim() != 1 or not 0 <= index < flags.numel():
        raise ValueError(f"flag {index} of {describe(flags)}: expected an index into a 1-D int32 vector")
    if status.dtype != torch.int32 or status.numel() < 4 or status.device != flags.device:
        raise ValueError(f"flag {index}: status must be >= 4 int32 on {flags.device}, got {describe(status)}")
    if value.epoch.device != flags.device:
        raise ValueError(f"flag {index}: the epoch is on {value.epoch.device}, the flags on {flags.device}")
    with launching(flags.device), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        kernel.flag_kernel[(1,)](flags, index, value.epoch, value.scale, value.offset, status, wait_id, bound,
                                 WAIT=wait, num_warps=1)  # fmt: skip


@functools.lru_cache(maxsize=None)
def warm_up(device: torch.device) -> None:
    """Compile and load both kernels on ``device`` now: an operator switching to them while a CUDA
    graph is being captured must not compile and load modules inside the capture."""
    flags, status = torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(4, dtype=torch.int32, device=device)
    with FIRST_LAUNCHES:
        write(flags, 0, EpochValue(flags), status)
        wait(flags, 0, EpochValue(flags), status, 0, 1e-6)
