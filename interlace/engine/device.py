"""Small device helpers shared by the engine and the benchmarks."""

from __future__ import annotations

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
