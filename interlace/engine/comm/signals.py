"""32-bit flags in (possibly shared) memory, raised and awaited with release/acquire ordering.

On a GPU the writes and waits are stream memory operations (``cuStreamWriteValue32``,
``cuStreamWaitValue32`` with >=): they order work on a stream and never block the host. On a CPU
"the stream" is the calling thread: ``write`` stores at once and ``wait`` blocks until the flag
is reached or the deadline passes. ``host_wait`` blocks the host with a deadline on either device.
Flags compare by ``(int32)(flag - value) >= 0``, so monotonic epochs may wrap.

Flags are addressed as (int32 vector, index); an index out of range is an ``IndexError``.
"""

from __future__ import annotations

import time

import torch

from interlace.ops.describe import describe

from .native import native

DEFAULT_TIMEOUT = 300.0
READ_TIMEOUT = 5.0  # seconds a host read of a GPU flag may take (its copy can queue behind blocked work)


class FlagTimeoutError(TimeoutError):
    """A flag did not reach its value in time. Attributes: rank, index, expected, observed."""

    def __init__(self, what: str, rank: int | None, index: int, expected: int, observed: int, timeout: float):
        self.what, self.rank, self.index, self.expected, self.observed, self.timeout = what, rank, index, expected, observed, timeout
        who = f"rank {rank}: " if rank is not None else ""
        super().__init__(f"{who}{what}flag {index} did not reach {expected} within {timeout:.3g} s (observed {observed})")

    def __reduce__(self):  # crosses process boundaries in spawn()
        return type(self), (self.what, self.rank, self.index, self.expected, self.observed, self.timeout)


def wrap(value: int) -> int:
    """``value`` as the int32 a flag holds: epochs and signal counts only grow, and wrap."""
    return (value + 2**31) % 2**32 - 2**31


def address(flags: torch.Tensor, index: int) -> int:
    """Byte address of ``flags[index]`` after checking the vector and the index."""
    if not isinstance(flags, torch.Tensor) or flags.dtype != torch.int32 or flags.dim() != 1 or not flags.is_contiguous():
        raise TypeError(f"flags must be a contiguous 1-D int32 tensor, got {describe(flags)}")
    if not isinstance(index, int) or not 0 <= index < flags.numel():
        raise IndexError(f"flag index {index} out of range for {flags.numel()} flags")
    return flags.data_ptr() + 4 * index


def write(flags: torch.Tensor, index: int, value: int, stream: torch.cuda.Stream | None = None) -> None:
    """``flags[index] = value`` (release): from ``stream`` on a GPU, at once on a CPU."""
    addr, value = address(flags, index), wrap(value)
    if flags.device.type == "cuda":
        _on_stream(flags.device, stream, lambda s: native().stream_write_value(s, addr, value))
    else:
        native().flag_store(addr, value)


def wait(flags: torch.Tensor, index: int, value: int, stream: torch.cuda.Stream | None = None, *,
         timeout: float = DEFAULT_TIMEOUT, rank: int | None = None) -> None:  # fmt: skip
    """Order ``stream`` after ``flags[index] >= value`` (GPU), or block this thread until then (CPU,
    raising ``FlagTimeoutError`` after ``timeout`` seconds)."""
    addr, value = address(flags, index), wrap(value)
    if flags.device.type == "cuda":
        _on_stream(flags.device, stream, lambda s: native().stream_wait_value(s, addr, value))
    else:
        host_wait(flags, index, value, timeout, rank=rank)


def host_wait(flags: torch.Tensor, index: int, value: int, timeout: float, *, rank: int | None = None, what: str = "") -> int:
    """Block the host until ``flags[index] >= value``; returns the value seen, or raises
    ``FlagTimeoutError`` naming the rank, the index, the expected and the observed value."""
    addr, value = address(flags, index), wrap(value)
    if flags.device.type != "cuda":
        observed = native().flag_wait(addr, value, timeout)
    else:
        observed = _poll_device(addr, value, timeout, flags.device.index or 0, f"{what}flag {index} of {describe(flags)}")
    if not native().flag_reached(observed, value):
        raise FlagTimeoutError(what, rank, index, value, observed, timeout)
    return observed


def read(flags: torch.Tensor, index: int, timeout: float = READ_TIMEOUT) -> int:
    """The current value (acquire), without synchronising the device's streams; a GPU read that
    takes longer than ``timeout`` seconds raises ``TimeoutError``."""
    addr = address(flags, index)
    if flags.device.type != "cuda":
        return native().flag_load(addr)
    return _device_load(addr, flags.device.index or 0, timeout, f"flag {index} of {describe(flags)}")


def _device_load(addr: int, device: int, timeout: float, what: str) -> int:
    try:
        return native().device_load(addr, device, timeout)
    except native().DeviceTimeout as error:
        raise TimeoutError(f"reading {what}: {error}") from None


def copy_chunks(chunks: list[tuple[torch.Tensor, torch.Tensor]], flags: torch.Tensor | None = None,
                indices: list[int] | None = None, value: int = 1, stream: torch.cuda.Stream | None = None) -> None:  # fmt: skip
    """Copy each ``(dst, src)`` pair, raising ``flags[indices[i]] = value`` after chunk i.

    GPU: ``cudaMemcpyAsync`` on ``stream`` (the copy engines) and a stream write per chunk; this is
    the producer for the GEMM's wait hook. CPU: memcpy then a release store, on this thread.
    """
    if (flags is None) != (indices is None) or indices is not None and len(indices) != len(chunks):
        raise ValueError(f"copy_chunks: {len(chunks)} chunks need flags and as many flag indices, or neither; "
                         f"got flags {describe(flags)} and indices {indices}")  # fmt: skip
    dst, src, sizes, cuda = [], [], [], None
    for i, (d, s) in enumerate(chunks):
        _check_chunk(i, d, s)
        if cuda is None:  # never `cuda or ...`: a tensor's truth value is its content
            cuda = next((t for t in (d, s) if t.is_cuda), None)
        dst.append(d.data_ptr())
        src.append(s.data_ptr())
        sizes.append(d.nbytes)
    flag_addrs = [address(flags, i) for i in indices] if indices is not None else [0] * len(chunks)  # checks flags
    if flags is not None and chunks and flags.is_cuda != (cuda is not None):
        raise ValueError(f"copy_chunks: {'GPU' if cuda is not None else 'host'} chunks raise flags on the same side; got {describe(flags)}")
    values = [wrap(value)] * len(chunks)
    if cuda is not None:  # any GPU side: the copy engines (pinned host memory included, over PCIe)
        _on_stream(cuda.device, stream, lambda s: native().copy_chunks_async(s, dst, src, sizes, flag_addrs, values))
    else:
        native().copy_chunks(dst, src, sizes, flag_addrs, values)


def _check_chunk(i: int, d: torch.Tensor, s: torch.Tensor) -> None:
    """Contiguous, equal sizes; host memory in a GPU copy must be pinned (the copy engines need it)."""
    mixed = d.is_cuda != s.is_cuda
    host_ok = not mixed or all(t.is_cuda or t.is_pinned() for t in (d, s))
    if not (d.is_contiguous() and s.is_contiguous()) or d.nbytes != s.nbytes or not host_ok:
        raise ValueError(f"copy_chunks: chunk {i} needs contiguous tensors of equal size, host memory pinned when the other "
                         f"side is on a GPU; got {describe(d)} <- {describe(s)}")  # fmt: skip


def _poll_device(addr: int, value: int, timeout: float, device: int, what: str) -> int:
    end, pause = time.monotonic() + timeout, 1e-5
    while True:
        # A read takes microseconds; one stuck past the deadline (50 ms at least) raises.
        observed = _device_load(addr, device, max(end - time.monotonic(), 0.05), what)
        if native().flag_reached(observed, value) or time.monotonic() >= end:
            return observed
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


def _on_stream(device: torch.device, stream: torch.cuda.Stream | None, enqueue) -> None:
    """``enqueue(handle)`` of ``stream``, default: ``device``'s current stream. Handle 0 (torch's
    default stream) is, to the driver, the legacy stream of the calling thread's current device:
    ``device`` is made current for it."""
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    if stream.cuda_stream != 0:
        enqueue(stream.cuda_stream)
        return
    with torch.cuda.device(stream.device):
        enqueue(0)
