"""The fused operators a group keeps, one per (pattern, shape, shots), and why one cannot run."""

from __future__ import annotations

from interlace.engine.comm import Group
from interlace.engine.comm.symmetric import AgreedFailure, all_or_none
from interlace.kernels.reduce import MAX_WORLD
from interlace.ops.gemm import INTERPRETING

from .base import FusedOp, cannot_launch_for
from .gather import FusedAllGatherMatmul
from .group_all_reduce import FusedMatmulGroupAllReduce
from .norm import FusedAllReduceResidualNorm
from .one_shot import FusedMatmulAllReduce, FusedMatmulReduceScatter
from .two_shot import FusedMatmulAllReduceTwoShot


_SHARED = {"ag_gemm": FusedAllGatherMatmul, "gemm_rs": FusedMatmulReduceScatter, "gemm_ar": FusedMatmulAllReduce,
           "ar_norm": FusedAllReduceResidualNorm}  # fmt: skip
_UNSHARED = {"gemm_ar": FusedMatmulGroupAllReduce}  # what runs where ranks share no memory


def workspace(group: Group, pattern: str, *shape, check: bool = True, shots: int = 1) -> FusedOp:
    """The fused operator for ``pattern`` and this shape on ``group``, made (collectively: every rank
    reaches it with the same shape) on first use and kept with the group; ``check`` applies to the
    calls that follow. ``shots``: 2 makes GEMM+AR two-shot (other patterns have one way only)."""
    table = group.__dict__.setdefault("_fused_workspaces", {})
    shots = shots if pattern == "gemm_ar" else 1
    key = (pattern, *shape, shots)
    if key not in table:
        reason = fused_unavailable(group, pattern, shots=shots)
        if reason is not None:
            raise RuntimeError(f"rank {group.rank}: overlap='fused' cannot run here: {reason}")
        kind = _SHARED[pattern] if group.memory_not_shared() is None else _UNSHARED[pattern]
        table[key] = (FusedMatmulAllReduceTwoShot if shots == 2 else kind)(group, *shape, check=check)
    table[key].check_calls = check
    return table[key]


def check_workspaces(group: Group) -> None:
    """Raise what any fused operator made for ``group`` recorded: after CUDA-graph replays, which
    never block the host, this says whether they completed (synchronises)."""
    for op in group.__dict__.get("_fused_workspaces", {}).values():
        op.check()


FUSED_WAIT = "a fused operator's wait"  # what agreed_failure tells the ranks whose own waits did not fail: "... failed on rank(s) [r]"


def agreed_failure(group: Group) -> str | None:
    """Collective: what a fused operator of ``group`` recorded on this rank (its waits gave up), a
    note that one on another rank did, or None: every rank learns whether any failed, so that all
    stop, or go on, together."""
    try:
        check_workspaces(group)
        mine = None
    except (TimeoutError, RuntimeError) as error:
        mine = str(error)
    try:
        all_or_none(group, mine, FUSED_WAIT)
    except AgreedFailure as error:
        return mine or str(error)
    return None


def close_workspaces(group: Group) -> None:
    """Collective: release every fused operator made for ``group``, in one order on every rank."""
    table = group.__dict__.pop("_fused_workspaces", {})
    for key in sorted(table, key=repr):
        table[key].close()


def fused_unavailable(group: Group, pattern: str, *, timing: bool = False, shots: int = 1) -> str | None:
    """Why fused ``pattern`` (two-shot GEMM+AR with ``shots=2``) cannot run (or, with ``timing``,
    cannot be timed meaningfully) on ``group``."""
    if reason := cannot_launch_for(group):
        return reason
    if timing and INTERPRETING:
        return "under the Triton interpreter a timing measures Python, not a kernel"
    if pattern == "ar_norm" and group.world_size > MAX_WORLD:
        return f"the fused all-reduce + RMSNorm reads at most {MAX_WORLD} ranks, the group has {group.world_size}"
    reason = group.memory_not_shared()
    if reason is not None and shots == 2:
        return (f"two-shot fused gemm_ar needs memory shared by every rank: {reason}; across nodes fused gemm_ar runs "
                "over the group's all-reduce, whose algorithm the transport picks (use shots=1)")  # fmt: skip
    return None if reason is None or pattern in _UNSHARED else f"fused {pattern} needs memory shared by every rank: {reason}"
