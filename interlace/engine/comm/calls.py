"""What a collective call is: validated arguments, the output it needs, and a signature to compare.

Shared by every transport so a call is checked the same way everywhere. Shapes, for world size W:

| call           | x (this rank)     | out (this rank)                                   |
|----------------|-------------------|---------------------------------------------------|
| all_gather     | [n, ...]          | [W*n, ...], rows r*n:(r+1)*n come from rank r      |
| reduce_scatter | [W*n, ...]        | [n, ...], reduction over ranks of their r-th slice  |
| all_reduce     | any shape         | same shape, reduction over ranks                    |
| all_to_all     | [W*n, ...]        | [W*n, ...], slice q comes from rank q's r-th slice  |
| send / recv    | tensor / buffer   | recv fills the buffer, which must match the send    |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CollectiveMismatchError

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send", "recv", "barrier")
REDUCE_OPS = ("sum", "avg", "max")
REDUCING = ("reduce_scatter", "all_reduce")
DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8, torch.bool,
)  # fmt: skip
NOT_REDUCIBLE = (torch.bool,)
MAX_DIMS = 8
# Signature layout: kind, dtype, op, ndim, then MAX_DIMS dims padded with -1.
SIGNATURE_LEN = 4 + MAX_DIMS


@dataclass(frozen=True, slots=True)
class Call:
    """One rank's validated part of a collective. ``out`` is allocated and ready to be written."""

    kind: str
    x: torch.Tensor | None
    out: torch.Tensor | None
    op: str | None = None
    peer: int | None = None

    @property
    def payload(self) -> torch.Tensor | None:
        """The tensor whose shape and dtype peers must agree on."""
        return self.out if self.kind == "recv" else self.x

    def signature(self) -> tuple[int, ...]:
        t = self.payload
        dims = list(t.shape) if t is not None else []
        head = (
            KINDS.index(self.kind),
            DTYPES.index(t.dtype) if t is not None else -1,
            REDUCE_OPS.index(self.op) if self.op is not None else -1,
            len(dims),
        )
        return head + tuple(dims + [-1] * (MAX_DIMS - len(dims)))


def label(call: Call, n: int) -> str:
    """How messages name a call: ``all_reduce #7`` (n-th collective) or ``send #2 to rank 3``."""
    if call.kind in ("send", "recv"):
        return f"{call.kind} #{n} {'to' if call.kind == 'send' else 'from'} rank {call.peer}"
    return f"{call.kind} #{n}"


def describe(sig: tuple[int, ...]) -> str:
    """``all_reduce(float32[4, 3], op=sum)`` from a signature."""
    kind, op = sig[0], sig[2]
    if kind == KINDS.index("barrier"):
        return "barrier()"
    suffix = f", op={REDUCE_OPS[op]}" if op >= 0 else ""
    return f"{KINDS[kind]}({describe_payload(sig)}{suffix})"


def describe_payload(sig: tuple[int, ...]) -> str:
    """``float32[4, 3]`` from a signature."""
    dtype, ndim = sig[1], sig[3]
    return f"{str(DTYPES[dtype]).removeprefix('torch.')}[{', '.join(str(d) for d in sig[4 : 4 + ndim])}]"


def check_agreement(what: str, sigs: list[tuple[int, ...]]) -> None:
    """Every rank of a collective must pass the same kind, op, dtype and shape."""
    if all(s == sigs[0] for s in sigs):
        return
    calls = "; ".join(f"rank {r} called {describe(s)}" for r, s in enumerate(sigs))
    raise CollectiveMismatchError(f"{what}: ranks disagree: {calls}")


def check_pair(what: str, send_rank: int, send_sig: tuple[int, ...], recv_rank: int, recv_sig: tuple[int, ...]) -> None:
    """A send and its receive must move the same dtype and shape."""
    if send_sig[1:] == recv_sig[1:]:
        return
    raise CollectiveMismatchError(
        f"{what}: rank {send_rank} sends {describe_payload(send_sig)} but rank {recv_rank} "
        f"receives into {describe_payload(recv_sig)}"
    )


def make_call(
    kind: str,
    rank: int,
    world_size: int,
    device: torch.device,
    x: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    op: str | None = None,
    peer: int | None = None,
) -> Call:
    """Validate one rank's arguments up front and allocate the output when none is given."""
    where = f"rank {rank}: {kind}"
    if kind in REDUCING:
        _check_op(where, op)
    if kind == "barrier":
        return Call(kind, None, None)
    if kind in ("send", "recv"):
        _check_peer(where, peer, rank, world_size)
    tensor = out if kind == "recv" else x
    name = "out" if kind == "recv" else "x"
    _check_tensor(where, name, tensor, device, op)
    if kind == "recv":
        _check_writable(where, "out", tensor)
        return Call(kind, None, tensor, peer=peer)
    x = x.contiguous()
    if kind == "send":
        return Call(kind, x, None, peer=peer)
    expected = _output_shape(where, kind, x, world_size)
    if out is None:
        out = torch.empty(expected, dtype=x.dtype, device=x.device)
    else:
        _check_out(where, kind, out, x, expected)
    return Call(kind, x, out, op=op)


def _check_op(where: str, op: str | None) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"{where}: op must be one of {REDUCE_OPS}, got {op!r}")


def _check_peer(where: str, peer: int | None, rank: int, world_size: int) -> None:
    if not isinstance(peer, int) or not 0 <= peer < world_size:
        raise ValueError(f"{where}: peer must be a rank in [0, {world_size}), got {peer!r}")
    if peer == rank:
        raise ValueError(f"{where}: peer {peer} is this rank itself; send/recv need another rank")


def _check_tensor(where: str, name: str, t: object, device: torch.device, op: str | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{where}: `{name}` has dtype {t.dtype}; supported: {[str(d) for d in DTYPES]}")
    if op is not None and t.dtype in NOT_REDUCIBLE:
        raise TypeError(f"{where}: cannot reduce `{name}` of dtype {t.dtype}")
    if op == "avg" and not t.dtype.is_floating_point:
        raise TypeError(f"{where}: op='avg' needs a floating dtype, `{name}` is {t.dtype}")
    if not _same_device(t.device, device):
        raise ValueError(f"{where}: `{name}` is on {t.device}, this group's device is {device}")
    if t.dim() > MAX_DIMS:
        raise ValueError(f"{where}: `{name}` has {t.dim()} dims; at most {MAX_DIMS} are supported")


def _check_writable(where: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{where}: `{name}` must be contiguous (it is written in place), got strides {t.stride()}")


def _output_shape(where: str, kind: str, x: torch.Tensor, world_size: int) -> tuple[int, ...]:
    if kind in ("all_gather", "reduce_scatter", "all_to_all") and x.dim() == 0:
        raise ValueError(f"{where}: `x` must have at least one dimension (rows are split or gathered)")
    if kind in ("reduce_scatter", "all_to_all") and x.shape[0] % world_size:
        raise ValueError(
            f"{where}: x.shape[0] must be divisible by the world size {world_size}, got shape {list(x.shape)}"
        )
    if kind == "all_gather":
        return (x.shape[0] * world_size, *x.shape[1:])
    if kind == "reduce_scatter":
        return (x.shape[0] // world_size, *x.shape[1:])
    return tuple(x.shape)


def _check_out(where: str, kind: str, out: torch.Tensor, x: torch.Tensor, expected: tuple[int, ...]) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where}: `out` must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != expected or out.dtype != x.dtype:
        raise ValueError(
            f"{where}: `out` must be {str(x.dtype).removeprefix('torch.')}{list(expected)}, "
            f"got {str(out.dtype).removeprefix('torch.')}{list(out.shape)}"
        )
    if not _same_device(out.device, x.device):
        raise ValueError(f"{where}: `out` is on {out.device} but `x` is on {x.device}")
    _check_writable(where, "out", out)
    if out is x and kind != "all_reduce":
        raise ValueError(f"{where}: `out` must not be `x` (only all_reduce works in place)")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)
