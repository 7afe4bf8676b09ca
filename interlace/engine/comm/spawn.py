"""Run a function on every rank of a fresh group: threads (``local``) or processes (``gloo``, ``nccl``).

Processes start from a forkserver that has torch preloaded (~1 s once, then a few tens of ms per
world); plain ``fork`` is never used (it hangs in the child's first matmul once the parent has run
a threaded op). The parent owns the rendezvous store (a TCPStore on port 0, so runs never clash).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .dist_group import DistGroup
from .errors import root_cause
from .local_group import run_threads
from .symmetric_group import SymmetricGroup

BACKENDS = ("local", "gloo", "nccl", "symmetric")
PRELOAD = ["torch", "torch.distributed", "interlace.engine.comm"]
# After the first rank fails, how long the others get to report before they are terminated.
FAILURE_GRACE = 5.0


class RemoteTraceback(Exception):
    """Carries a rank's formatted traceback as the ``__cause__`` of the re-raised exception."""

    def __str__(self) -> str:
        return self.args[0]


class RankFailedError(RuntimeError):
    """A rank failed in a way that could not be re-raised as its own exception (e.g. it died)."""


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    backend: str = "local",
    *,
    timeout: float = 60.0,
    deadline: float | None = None,
    args: tuple = (),
    device: str | torch.device | None = None,
    check: bool = True,
) -> list[Any]:
    """Run ``fn(group, *args)`` on ``world_size`` ranks and return the results in rank order.

    - ``backend``: ``"local"`` (threads, :class:`LocalGroup`; ``device`` picks CPU or one GPU),
      ``"gloo"`` (CPU processes) or ``"nccl"`` (GPU processes; ranks beyond the GPU count share
      GPUs, correct but time-sliced: never time them), both giving a :class:`DistGroup`, or
      ``"symmetric"`` (processes of this node over shared buffers, :class:`SymmetricGroup`;
      ``device="cuda"`` for GPU buffers over CUDA IPC, CPU shared memory otherwise).
    - ``timeout``: the deadline of every collective wait; ``deadline``: optional bound on the
      whole run, after which unfinished ranks are named in a ``TimeoutError``.
    - ``check``: DistGroup's cross-rank signature checks (LocalGroup always checks; it is free).
    If a rank raises, its exception is re-raised here with the rank's traceback as its cause;
    for processes ``fn`` must be a module-level function (it is pickled).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on = torch.device(device or ("cuda" if backend == "nccl" else "cpu")).type
    required = {"gloo": "cpu", "nccl": "cuda"}.get(backend)  # local and symmetric run on either
    if required is not None and on != required:
        raise ValueError(f"backend={backend!r} runs its ranks on {required.upper()} tensors, got device={device!r}")
    if on == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"backend={backend!r} with device={device!r} needs a CUDA GPU, and torch.cuda.is_available() is False here")
    if backend == "local":
        return run_threads(fn, world_size, device=device or "cpu", timeout=timeout, deadline=deadline, args=args)
    transport = "nccl" if on == "cuda" else "gloo"
    _check_picklable(fn, args, backend)
    return _run_processes(fn, world_size, (backend, transport), timeout, deadline, args, check)


def _check_picklable(fn: Callable, args: tuple, backend: str) -> None:
    try:
        pickle.dumps((fn, args))
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TypeError(
            f"backend={backend!r} pickles fn and args into the rank processes; use a module-level "
            f"function and picklable args ({error})"
        ) from error


def _run_processes(fn, world_size, backend, timeout, deadline, args, check) -> list[Any]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server first starts
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    procs = []
    for rank, (_, send_end) in enumerate(pipes):
        rank_args = (fn, args, rank, world_size, backend, store.port, timeout, check, send_end)
        procs.append(ctx.Process(target=_rank_main, args=rank_args, daemon=True, name=f"interlace-rank-{rank}"))
        procs[-1].start()
        send_end.close()
    try:
        return _collect(procs, [recv_end for recv_end, _ in pipes], deadline)
    finally:
        for p in procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join()


def _rank_main(fn, args, rank, world_size, backends, port, timeout, check, conn) -> None:
    """Body of a rank process: join the group, run fn, report the result or the failure."""
    backend, transport = backends
    try:
        _configure_transport(transport, rank, world_size)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout))
        dist.init_process_group(transport, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        group = DistGroup(store=store, timeout=timeout, check=check)
        if backend == "symmetric":
            group = SymmetricGroup(group, timeout=timeout)
        result = fn(group, *args)
    except BaseException as error:  # reported to the parent, which re-raises it
        conn.send_bytes(pickle.dumps(("error", _pack_error(error))))
    else:
        conn.send_bytes(pickle.dumps(("ok", result)))  # before teardown: a broken peer must not cost the result
        try:
            group.barrier()  # nobody tears down connections or buffers a peer still uses
            group.close()
        except BaseException as error:  # after the report: said here, not lost
            print(f"interlace spawn: rank {rank} reported its result, then teardown failed: {error}", file=sys.stderr, flush=True)
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _configure_transport(backend: str, rank: int, world_size: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank of a spawned world is local
    if backend != "nccl":
        return
    gpus = torch.cuda.device_count()
    torch.cuda.set_device(rank % gpus)
    if world_size > gpus:
        # Several ranks per GPU: NCCL rejects duplicate (host, bus id) pairs, so each rank poses as
        # its own host and NCCL talks over loopback sockets. Correct, slow: correctness only.
        os.environ["NCCL_HOSTID"] = f"interlace-rank-{rank}"
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_IB_DISABLE", "1")


def _pack_error(error: BaseException) -> tuple[bytes | None, str, str]:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        blob = pickle.dumps(error)
        pickle.loads(blob)
    except Exception:
        blob = None
    return blob, f"{type(error).__name__}: {error}", text


def _collect(procs: list, conns: list, deadline: float | None) -> list[Any]:
    """Gather every rank's report; stop early once a rank failed and the others had their grace."""
    results: dict[int, Any] = {}
    failures: list[tuple[int, BaseException]] = []
    waiting = dict(enumerate(conns))
    limit = None if deadline is None else time.monotonic() + deadline
    while waiting:
        remaining = None if limit is None else max(0.0, limit - time.monotonic())
        owner = {procs[r].sentinel: r for r in waiting} | {conn: r for r, conn in waiting.items()}
        ready = mpc.wait(list(owner), timeout=remaining)
        if not ready:
            break
        for rank in sorted({owner[obj] for obj in ready}):
            report = _read_report(rank, waiting.pop(rank), procs[rank])
            if isinstance(report, BaseException):
                if not failures:
                    grace_end = time.monotonic() + FAILURE_GRACE
                    limit = grace_end if limit is None else min(limit, grace_end)
                failures.append((rank, report))
            else:
                results[rank] = report
    if failures:
        raise root_cause(failures)
    if waiting:
        raise TimeoutError(f"ranks {sorted(waiting)} of {len(procs)} still running after the {deadline} s deadline")
    return [results[r] for r in range(len(procs))]


def _read_report(rank: int, conn, proc) -> Any:
    """The rank's result, or an exception describing how it failed."""
    try:
        status, payload = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        proc.join(timeout=1.0)
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return RankFailedError(f"rank {rank} died ({how}) without reporting a result; its stderr may say why "
                               '(a script must start process ranks under `if __name__ == "__main__":`, as they import it)')
    if status == "ok":
        return payload
    blob, summary, text = payload
    error = pickle.loads(blob) if blob is not None else RankFailedError(f"rank {rank} raised {summary}")
    error.__cause__ = RemoteTraceback(f"\n--- traceback of rank {rank} ---\n{text}")
    return error
