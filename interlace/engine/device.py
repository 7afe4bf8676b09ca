"""Small device helpers shared by the engine and the benchmarks."""

from __future__ import annotations

import weakref

import torch


def synchronize(device: torch.device | torch.Tensor) -> None:
    """Wait for all queued work on a CUDA device (no-op on CPUs)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record_event(device: torch.device, stream: torch.cuda.Stream | None = None) -> torch.cuda.Event | None:
    """An event recorded on ``stream`` (default: the current one) of a CUDA device; None on CPUs."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(stream if stream is not None else torch.cuda.current_stream(device))
    return event


def new_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream of its own. ``torch.cuda.Stream()`` hands out pooled streams round-robin (32
    per priority), so two of those can be one CUDA stream, and a stream wait queued on one would
    hold back the other's work: every stream that waits on a peer, or that a peer waits on, comes
    from here. Destroyed when the returned object is collected (CUDA lets queued work finish)."""
    from interlace.engine.comm.native import native

    index = device.index if device.index is not None else torch.cuda.current_device()
    handle = native().stream_create(index)
    stream = torch.cuda.ExternalStream(handle, device=torch.device("cuda", index))
    weakref.finalize(stream, native().stream_destroy, handle, index)
    return stream
