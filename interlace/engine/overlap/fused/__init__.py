"""Fused overlap: one GEMM launch overlapped with its collective through symmetric memory and flags.

Needs ranks that share memory (LocalGroup, SymmetricGroup, or a one-node DistGroup) and a Triton
GEMM (a GPU, or the interpreter). Construction and ``close()`` are collective.

| operator | this rank's shapes | how |
|---|---|---|
| ``FusedAllGatherMatmul`` | x_shard_m [n, K] -> y [W*n, N] | each rank publishes its rows in its own buffer (flag r = epoch); the lane pulls every peer's rows into the local gathered buffer with copy-engine chunks, a flag per chunk; ONE GEMM waits per tile on its chunk's flag, own rows first |
| ``FusedMatmulReduceScatter`` | x [W*n, K_s] -> y_shard_m [n, N] | ONE GEMM writes its partial products into the symmetric buffer, counting finished outputs per destination block (peers' blocks first); the lane waits (stream waits, no spinning kernel) on each peer's count for this rank's block and pulls it with the copy engines while the GEMMs go on; then one local reduction in rank order |
| ``FusedMatmulAllReduce`` | x [M, K_s] -> y [M, N] | the same GEMM counting row chunks; the lane pulls every peer's chunk as soon as that peer has finished it, then reduces locally in rank order (every rank gets the same bits) |
| ``FusedMatmulAllReduceTwoShot`` | x [M, K_s] -> y [M, N] | the same GEMM counting row chunks; per chunk, each rank pulls and sums its 1/W piece of every peer's rows, publishes the sum, and pulls the peers' sums while the GEMM computes the next chunk: 2(W-1)/W of the output moved, where one-shot moves W-1 times it |
| ``FusedMatmulGroupAllReduce`` | x [M, K_s] -> y [M, N] | for ranks that share no memory (several nodes): the same GEMM counting row chunks in a private counter; the lane waits on each chunk's count and all-reduces it with the group's own all-reduce (NCCL) while the GEMM goes on |
| ``FusedAllReduceResidualNorm`` | partial [M, H] -> RMSNorm(residual + sum), residual + sum | decode (small M): each rank writes its partial into symmetric memory and raises a flag; ONE kernel per rank reads every peer's rows, sums in rank order, adds the residual and normalises |

Epochs: call e raises flags to e (signal counters to e * the chunk's outputs), so nothing is ever reset. Before a
rank overwrites its buffer for call e, every peer must have finished reading it for call e-1.

CUDA graphs: the epoch also lives on the device (``epoch_now``, advanced by a kernel on the caller's
stream each call) and the GEMM reads it there. Eagerly the lane's flags are stream memory operations
with the host's epoch; a call captured in a CUDA graph (or any call with ``graph_safe=True``) makes
them one-thread kernels reading ``epoch_now``, so each replay is the next epoch. The switch is for
good: after replays only the device knows the epoch. A replayed wait that gives up records it in
``status``; ``check()`` raises it (after replays, call it to know they completed).
"""

from .base import FusedOp
from .gather import FusedAllGatherMatmul
from .group_all_reduce import FusedMatmulGroupAllReduce
from .norm import FusedAllReduceResidualNorm
from .one_shot import FusedMatmulAllReduce, FusedMatmulReduceScatter
from .two_shot import REDUCE_SMS, FusedMatmulAllReduceTwoShot
from .workspaces import agreed_failure, check_workspaces, close_workspaces, fused_unavailable, workspace

__all__ = [
    "REDUCE_SMS", "FusedAllGatherMatmul", "FusedAllReduceResidualNorm", "FusedMatmulAllReduce", "FusedMatmulAllReduceTwoShot",
    "FusedMatmulGroupAllReduce", "FusedMatmulReduceScatter", "FusedOp", "agreed_failure", "check_workspaces", "close_workspaces",
    "fused_unavailable", "workspace",
]  # fmt: skip
