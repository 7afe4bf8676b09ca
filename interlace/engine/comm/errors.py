"""Typed communication errors. Every message names the collective, the rank and the numbers."""

from __future__ import annotations


class CommError(RuntimeError):
    """Base class of interlace communication errors."""


class CommTimeoutError(CommError, TimeoutError):
    """A wait passed its deadline.

    Attributes: ``what`` (e.g. ``"all_reduce #7"``), ``rank``, ``timeout`` (seconds) and
    ``missing``: the peers not heard from, or ``None`` when the transport cannot tell.
    """

    def __init__(self, what: str, rank: int, timeout: float, missing: list[int] | None, detail: str = ""):
        self.what, self.rank, self.timeout, self.missing, self.detail = what, rank, timeout, missing, detail
        peers = "unknown (no store to ask)" if missing is None else (str(missing) if missing else "none")
        msg = f"{what} on rank {rank} timed out after {timeout:.3g} s; peers not heard from: {peers}"
        super().__init__(msg + (f"; {detail}" if detail else ""))

    def __reduce__(self):  # crosses process boundaries in spawn()
        return type(self), (self.what, self.rank, self.timeout, self.missing, self.detail)


class CollectiveMismatchError(CommError, ValueError):
    """Ranks called the same collective step with incompatible arguments (or different collectives)."""


class PeerFailedError(CommError):
    """A peer rank failed or finished while this rank waited for it."""


def root_cause(failures: list[tuple[int, BaseException]]) -> BaseException:
    """Of the (rank, error) failures in the order they happened, the one most likely to be the cause.

    Communication errors are usually reactions to another rank's failure, and a peer failure is
    always one; prefer, in turn, the first non-communication error, the first other comm error.
    """
    for reaction in (CommError, PeerFailedError):
        for _, error in failures:
            if not isinstance(error, reaction):
                return error
    return failures[0][1]
