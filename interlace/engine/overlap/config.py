"""One overlap configuration per layer: which strategy, and how finely to split."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("bulk", "chunked", "fused", "auto")


@dataclass(kw_only=True, slots=True, frozen=True)
class OverlapConfig:
    """How a tensor-parallel layer overlaps its collective with its GEMM."""

    strategy: str = "bulk"
    """``"bulk"``: the whole collective, then the whole GEMM (or the reverse): the reference.
    ``"chunked"``: GEMM and collective split into ``chunks`` pieces; the collective of one piece
    runs (on the transport's thread or stream) while the next piece computes.
    ``"fused"``: one GEMM launch overlapped through symmetric memory and flags (ranks sharing a
    node; see the fused package).
    ``"auto"``: what the dispatcher measured fastest for this call, never slower than bulk."""

    chunks: int = 4
    """Pieces per call for ``"chunked"`` GEMM+RS and GEMM+AR (fewer when there are fewer rows).
    AG+GEMM always uses one chunk per rank, passed around a ring (see collective_matmul.py)."""

    shots: int = 1
    """``"fused"`` GEMM+AR where ranks share memory: ``1``, one-shot (every rank pulls every peer's
    partial: (W-1)·M·N elements in, fewest steps, for few rows); ``2``, two-shot (each rank sums
    1/W of every row chunk, then gathers the others' sums: 2(W-1)/W·M·N, for many rows at large W;
    see ``FusedMatmulAllReduceTwoShot``). Other patterns have one way only. Across nodes, two-shot
    raises: there fused GEMM+AR runs over the group's all-reduce, whose algorithm it picks."""

    norm_rows: int = 16
    """``"fused"`` in ``parallelize()``d decoder layers: a call of at most this many token rows
    (decode), without autograd, all-reduces the attention output projection, adds the residual and
    applies the post-attention RMSNorm in ONE kernel (``FusedAllReduceResidualNorm``); 0: never.
    16 is a starting point, not yet measured."""

    check: bool = True
    """``"fused"`` on a GPU: block the host after each call until it finished, raising with the
    lagging peers named past the group's deadline (stream waits have none of their own). Turn off
    in production once a deployment is proven; on CPUs it costs nothing."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"OverlapConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.chunks, int) or self.chunks < 1:
            raise ValueError(f"OverlapConfig.chunks must be a positive int, got {self.chunks!r}")
        if type(self.shots) is not int or self.shots not in (1, 2):
            raise ValueError(f"OverlapConfig.shots must be 1 (one-shot) or 2 (two-shot), got {self.shots!r}")
        if not isinstance(self.norm_rows, int) or self.norm_rows < 0:
            raise ValueError(f"OverlapConfig.norm_rows must be a non-negative int, got {self.norm_rows!r}")


def bulk() -> OverlapConfig:
    return OverlapConfig(strategy="bulk")


def chunked(chunks: int = 4) -> OverlapConfig:
    return OverlapConfig(strategy="chunked", chunks=chunks)


def as_config(overlap: OverlapConfig | str | None) -> OverlapConfig:
    """Accept a config, a strategy name, or None (bulk)."""
    if overlap is None:
        return bulk()
    if isinstance(overlap, str):
        return OverlapConfig(strategy=overlap)
    if isinstance(overlap, OverlapConfig):
        return overlap
    raise TypeError(f"overlap must be an OverlapConfig, a strategy name or None, got {type(overlap).__name__}")
