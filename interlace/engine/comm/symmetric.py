"""Symmetric buffers: the same-sized buffer and int32 signal pad on every rank of one node, each
rank able to read and write every peer's as a tensor.

Processes on GPUs: ``cudaMalloc`` + CUDA IPC (also between processes sharing one GPU). Processes
on CPUs: POSIX shared memory under unique names, unlinked as soon as every rank has mapped it
(and by any survivor if allocation fails), so nothing is left in /dev/shm even when a rank dies.
Rank threads of a LocalGroup share one address space: plain tensors on the group's device.

Collective calls (every rank of the group, in the same order): ``SymmetricBuffer.allocate`` and
``close``. Tensors handed out by ``data``/``peer``/``flags`` must not be used after ``close``.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
import torch

from ..device import synchronize
from .group import Group
from .native import native

ALIGN = 256  # the signal pad starts on this boundary (cudaMalloc's alignment)
HANDLE_BYTES = 128


class SymmetricBuffer:
    """See the module docstring. Layout per rank: ``nbytes`` of data, then ``num_flags`` int32s."""

    def __init__(self, group: Group, nbytes: int, num_flags: int, memory: _Memory, addresses: list[int]):
        self.group, self.rank, self.world_size = group, group.rank, group.world_size
        self.nbytes, self.num_flags, self.device = nbytes, num_flags, memory.device
        self._memory, self._addresses = memory, addresses
        self._pad = _round_up(nbytes, ALIGN)
        self._views = [memory.tensor(a, self._pad + 4 * num_flags) for a in addresses]
        self._closed = False

    @classmethod
    def allocate(cls, group: Group, nbytes: int, num_flags: int = 0) -> SymmetricBuffer:
        """Collective: every rank gets ``nbytes`` of data (zeroed) and ``num_flags`` flags (zero),
        on ``group.device``; ranks must agree on both sizes."""
        _agree_on_sizes(group, nbytes, num_flags)
        total = _round_up(nbytes, ALIGN) + 4 * num_flags
        memory = _memory_for(group)
        return cls(group, nbytes, num_flags, memory, memory.allocate(max(total, 4)))

    def data(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s data bytes, ``uint8 [nbytes]``."""
        return self._view(rank)[: self.nbytes]

    def peer(self, rank: int, dtype: torch.dtype = torch.uint8, shape: tuple[int, ...] | None = None, offset: int = 0) -> torch.Tensor:
        """Rank ``rank``'s data from byte ``offset`` as ``dtype``, optionally reshaped."""
        size = dtype.itemsize * (int(np.prod(shape)) if shape is not None else (self.nbytes - offset) // dtype.itemsize)
        if offset % dtype.itemsize or offset < 0 or offset + size > self.nbytes:
            raise ValueError(f"rank {self.rank}: a {dtype} view of {size} bytes at offset {offset} does not fit "
                             f"{self.nbytes} bytes (or is misaligned)")  # fmt: skip
        view = self._view(rank)[offset : offset + size].view(dtype)
        return view.view(shape) if shape is not None else view

    def flags(self, rank: int) -> torch.Tensor:
        """Rank ``rank``'s signal pad, ``int32 [num_flags]``."""
        return self._view(rank)[self._pad :].view(torch.int32)

    def close(self) -> None:
        """Collective: unmap peers, then free this rank's memory once no peer maps it."""
        if self._closed:
            return
        self._closed = True
        self._views = []
        # this rank's queued GPU work may still touch peers' memory
        synchronize(self.device, self.group.timeout, f"rank {self.rank} closing a symmetric buffer")
        self.group.barrier()  # nobody still uses a peer's memory
        for r, a in enumerate(self._addresses):
            if r != self.rank:
                self._memory.release_peer(a)
        self.group.barrier()  # nobody still maps this rank's memory
        self._memory.release_own(self._addresses[self.rank])

    def __enter__(self) -> SymmetricBuffer:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def abandon(self) -> None:
        """Not collective, for error paths: stop using the buffer, and keep every mapping (the
        process's exit frees them): a peer may still map this rank's memory, and work of this rank
        still queued (a lane's copies behind a wait never satisfied) may still read a peer's.
        Shared-memory names are already gone."""
        self._closed = True
        self._views = []

    def _view(self, rank: int) -> torch.Tensor:
        if self._closed:
            raise RuntimeError(f"rank {self.rank}: SymmetricBuffer used after close()")
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise IndexError(f"rank {self.rank}: peer rank {rank} out of range for world size {self.world_size}")
        return self._views[rank]


class _Memory:
    """How one kind of memory is allocated, exported, mapped and released."""

    device: torch.device

    def allocate(self, nbytes: int) -> list[int]:
        """Collective: this rank's allocation and every peer's mapping, as addresses in rank order."""
        raise NotImplementedError

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        raise NotImplementedError

    def release_peer(self, address: int) -> None:
        raise NotImplementedError

    def release_own(self, address: int) -> None:
        raise NotImplementedError


class _HostMemory(_Memory):
    """POSIX shared memory named ``/interlace-<token>-r<rank>``; names are unlinked once mapped."""

    def __init__(self, group: Group):
        self.group, self.device = group, torch.device("cpu")

    def allocate(self, nbytes: int) -> list[int]:
        g = self.group
        token = _exchange(g, f"{os.getpid():x}-{secrets.token_hex(6)}".encode())[0].decode()
        names = [f"/interlace-{token}-r{r}" for r in range(g.world_size)]
        self.nbytes, mapped = nbytes, []
        try:
            own = native().shm_create(names[g.rank], nbytes)
            mapped.append(own)
            g.barrier()  # every segment exists
            addresses = [own if r == g.rank else native().shm_attach(names[r], nbytes) for r in range(g.world_size)]
            mapped = addresses
            g.barrier()  # every rank has mapped every segment: the names are no longer needed
            native().shm_remove(names[g.rank])
            return addresses
        except BaseException:
            for name in names:  # any survivor cleans up every name: a dead rank leaves nothing behind
                native().shm_remove(name)
            for address in mapped:
                native().unmap(address, nbytes)
            raise

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        return torch.from_dlpack(native().byte_view(address, nbytes, _DL_CPU, 0))

    def release_peer(self, address: int) -> None:
        native().unmap(address, self.nbytes)

    release_own = release_peer


class _DeviceMemory(_Memory):
    """``cudaMalloc`` on the group's GPU, shared by CUDA IPC handles (not with oneself)."""

    def __init__(self, group: Group):
        self.group, self.device = group, group.device
        self.index = group.device.index if group.device.index is not None else torch.cuda.current_device()

    def allocate(self, nbytes: int) -> list[int]:
        g, peers, failure = self.group, {}, None
        own = native().device_malloc(nbytes, self.index, g.timeout)  # zero-filled before it returns
        try:
            handle = native().ipc_handle(own, self.index)
        except BaseException:
            native().device_free(own, self.index)
            raise
        # Once its handle is out, `own` is freed only after every peer has closed its mapping of it
        # (CUDA: freeing first is undefined); a failure that leaves that unknown leaves it allocated.
        handles = _exchange(g, handle)
        try:
            for r, peer_handle in enumerate(handles):
                if r != g.rank:
                    peers[r] = native().ipc_open(peer_handle, self.index)
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"
        try:  # every rank maps every peer, or none keeps a mapping
            all_or_none(g, failure, "mapping its peers' symmetric buffers through CUDA IPC")
        except BaseException as error:
            for address in peers.values():
                native().ipc_close(address, self.index)
            if isinstance(error, AgreedFailure):  # every rank is here, closing: then free
                g.barrier()
                native().device_free(own, self.index)
            raise
        return [peers.get(r, own) for r in range(g.world_size)]

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        return torch.from_dlpack(native().byte_view(address, nbytes, _DL_CUDA, self.index))

    def release_peer(self, address: int) -> None:
        native().ipc_close(address, self.index)

    def release_own(self, address: int) -> None:
        native().device_free(address, self.index)


class _ThreadMemory(_Memory):
    """LocalGroup ranks are threads of one process: each allocates a tensor; ranks share them."""

    def __init__(self, group: Group):
        self.group, self.device = group, group.device
        self.tensors: dict[int, torch.Tensor] = {}

    def allocate(self, nbytes: int) -> list[int]:
        own = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        synchronize(self.device, self.group.timeout, f"rank {self.group.rank} allocating a symmetric buffer")  # peers read it from their own streams
        peers = self.group.share(own)
        self.tensors = {t.data_ptr(): t for t in peers}
        return [t.data_ptr() for t in peers]

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        return self.tensors[address][:nbytes]

    def release_peer(self, address: int) -> None:
        self.tensors.pop(address, None)

    release_own = release_peer


def _memory_for(group: Group) -> _Memory:
    if hasattr(group, "share"):
        return _ThreadMemory(group)
    return _DeviceMemory(group) if group.device.type == "cuda" else _HostMemory(group)


_DL_CPU, _DL_CUDA = 1, 2  # DLPack device types of native().byte_view: views on the device they name, never copies


def _agree_on_sizes(group: Group, nbytes: int, num_flags: int) -> None:
    if not isinstance(nbytes, int) or nbytes < 0 or not isinstance(num_flags, int) or num_flags < 0:
        raise ValueError(f"rank {group.rank}: SymmetricBuffer needs non-negative int sizes, got nbytes={nbytes!r}, num_flags={num_flags!r}")
    sizes = group.all_gather(torch.tensor([[nbytes, num_flags]], dtype=torch.int64, device=group.device)).tolist()
    if any(s != sizes[0] for s in sizes):
        each = "; ".join(f"rank {r} asked for {b} bytes and {f} flags" for r, (b, f) in enumerate(sizes))
        raise ValueError(f"SymmetricBuffer.allocate: ranks disagree on the size: {each}")


class AgreedFailure(RuntimeError):
    """Raised by :func:`all_or_none` on every rank of a group at once."""


def all_or_none(group: Group, failure: str | None, what: str) -> None:
    """Collective: raise ``AgreedFailure`` on every rank, naming the ranks that failed ``what``
    (and this rank's ``failure``), if any rank did; return on every rank otherwise."""
    failed = group.all_gather(torch.tensor([[failure is not None]], dtype=torch.uint8, device=group.device)).flatten().tolist()
    if any(failed):
        ranks = [r for r, f in enumerate(failed) if f]
        raise AgreedFailure(f"rank {group.rank}: {what} failed on rank(s) {ranks}" + (f": {failure}" if failure else ""))


def _exchange(group: Group, blob: bytes) -> list[bytes]:
    """Every rank's ``blob`` (at most HANDLE_BYTES), in rank order."""
    if len(blob) > HANDLE_BYTES:
        raise ValueError(f"handle of {len(blob)} bytes exceeds {HANDLE_BYTES}")
    row = torch.zeros(1, HANDLE_BYTES + 1, dtype=torch.uint8)
    row[0, 0] = len(blob)
    row[0, 1 : 1 + len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    rows = group.all_gather(row.to(group.device)).cpu()
    return [bytes(r[1 : 1 + int(r[0])].tolist()) for r in rows]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
