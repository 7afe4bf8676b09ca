"""Communication layer: one interface (:class:`Group`), three transports.

- :class:`LocalGroup`: ranks as threads of one process (CPU, or one GPU with a stream per rank).
- :class:`DistGroup`: a ``torch.distributed`` process group (NCCL or gloo), any number of nodes.
- :class:`SymmetricGroup`: the processes of one node over symmetric buffers (CUDA IPC, or POSIX
  shared memory on CPUs); see ``symmetric.py`` and ``signals.py`` for the primitives beneath.
- :func:`spawn`: run ``fn(group)`` on every rank of a fresh group and collect the results.
"""

from .calls import REDUCE_OPS
from .dist_group import DistGroup
from .errors import CollectiveMismatchError, CommError, CommTimeoutError, PeerFailedError
from .group import Group, Work
from .local_group import LocalGroup, run_threads
from .spawn import BACKENDS, RankFailedError, spawn
from .symmetric import SymmetricBuffer
from .symmetric_group import SymmetricGroup

__all__ = [
    "BACKENDS", "REDUCE_OPS", "CollectiveMismatchError", "CommError", "CommTimeoutError", "DistGroup",
    "Group", "LocalGroup", "PeerFailedError", "RankFailedError", "SymmetricBuffer", "SymmetricGroup", "Work",
    "run_threads", "spawn",
]  # fmt: skip
