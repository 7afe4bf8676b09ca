"""Communication layer: one interface (:class:`Group`), three transports.

- :class:`LocalGroup`: ranks as threads of one process (CPU, or one GPU with a stream per rank).
- :class:`DistGroup`: a ``torch.distributed`` process group (NCCL or gloo), any number of nodes.
- :func:`spawn`: run ``fn(group)`` on every rank of a fresh group and collect the results.
"""

from .calls import REDUCE_OPS
from .dist_group import DistGroup
from .errors import CollectiveMismatchError, CommError, CommTimeoutError, PeerFailedError
from .group import Group, Work
from .local_group import LocalGroup, run_threads
from .spawn import BACKENDS, RankFailedError, spawn

__all__ = [
    "BACKENDS", "REDUCE_OPS", "CollectiveMismatchError", "CommError", "CommTimeoutError", "DistGroup",
    "Group", "LocalGroup", "PeerFailedError", "RankFailedError", "Work", "run_threads", "spawn",
]  # fmt: skip
