"""The GPU side of the rank-slice harness (see rank_slice.py); imported only when CUDA exists."""

from __future__ import annotations

import contextlib
import itertools

import torch

from interlace.engine.comm import signals
from interlace.engine.comm.reduce import reduce_into
from interlace.engine.device import new_stream
from interlace.engine.overlap.dispatch import pick
from interlace.engine.overlap.fused import REDUCE_SMS
from interlace.engine.overlap.fused.base import chunk_rows_for
from interlace.ops.gemm import SignalHook, WaitHook, chunk_outputs, gemm, leave_sms, plan_for

from .common import around, copy_rate, event_median, median_time, relative_error, settle
from .rank_slice import ROW_CHUNKS, STRATEGIES

WARMUP = 3
# GPU time, not Python's: each timed run is queued behind a ~1 ms sleep kernel, so the host has
# enqueued the whole run (a fused call is several launches) before its start event is reached.
HEADSTART_CYCLES = 2_000_000
# A fused GEMM's wait that gives up does so well before settle() calls the stream stuck
# (STUCK_AFTER_S): the shape becomes a failed row, with what the wait saw, and the run goes on.
WAIT_TIMEOUT_S = 10.0


def measure(shape: dict, regime: str, world: int, dtype: torch.dtype, iters: int) -> tuple[dict[str, float], str]:
    """``(times, pick)``: median seconds of gemm (cuBLAS), gemm_triton (the Triton GEMM on every SM,
    no hooks), gemm_hooked (fused's GEMM alone), comm, bulk, chunked, fused and the GEMM under
    overlap (``fused_gemm``: inside fused; for AG beside the copies, its flags raised); where the dispatcher's rule (``dispatch.pick``) picks other than bulk on those, of a
    fresh run of its pick (``auto``); last, of bulk again (``bulk_again``): the same code timed
    twice, whose difference is the noise, and the fresh bulk the pick is judged against. First
    chunked and fused are checked against bulk, result and what was sent, from NaN in every buffer
    data arrives in and with their data held back (``Delay``): a run that reads before its data
    has landed fails. ``StuckStream`` when queued work does not finish (nothing more can run in
    this process)."""
    build = {"ag_gemm": _all_gather, "gemm_rs": _reduce_scatter, "gemm_ar": _all_reduce, "gemm_ar_two_shot": _all_reduce_two_shot}[shape["pattern"]]
    label = f"rank slice {shape['name']} [{regime}]"
    status, delay = torch.zeros(4, dtype=torch.int32, device="cuda"), Delay()
    variants = build(shape, regime, world, dtype, status, delay)
    poison, sent = variants.pop("poison"), variants.pop("sent")
    for name in ("chunked", "fused", "gemm_hooked"):  # compiled and loaded first: a launch compiling
        variants[name]()  # for longer than Delay's hold would check nothing
    settle(f"{label}: warming up")
    poison()
    expected = variants["bulk"]().to(torch.float32, copy=True)  # a copy: a variant may return a buffer that poison() fills
    if not expected.isfinite().all():
        raise AssertionError(f"{label}: bulk's result holds NaN or inf: the reference read a buffer before its data landed")
    expected_sent = [t.to("cuda", copy=True) for t in sent]  # compared on the GPU: the host regime's are up to GBs
    if not all(t.isfinite().any() for t in expected_sent):  # relative_error compares where bulk wrote
        raise AssertionError(f"{label}: bulk sent nothing into a buffer standing in for a peer's")
    for name in ("chunked", "fused"):
        poison()
        with delay.held():  # a consumer that reads before its data has landed reads NaN, whatever the host's pace
            got = variants[name]().to(torch.float32, copy=True)
        settle(f"{label}: checking {name}")
        errors = [("its result", relative_error(got, expected))]
        errors += [(f"what it sent ({i})", relative_error(t.to("cuda"), e)) for i, (t, e) in enumerate(zip(sent, expected_sent))]
        for what, error in errors:
            if not error < 2e-2:  # bf16 rounding of differently ordered sums, relative to the largest element
                raise AssertionError(f"{label}: {name} differs from bulk in {what} by {error:.3g} (relative)")
        if status.any():
            raise AssertionError(f"{label}: a fused wait gave up while checking: status {status.tolist()}")

    def median(name: str, run) -> float:
        return event_median(run, iters, warmup=WARMUP, headstart_cycles=HEADSTART_CYCLES, what=f"{label}: timing {name}")

    times = {name: median(name, around(fn)) for name, fn in variants.items() if name != "fused_gemm"}
    times["fused_gemm"] = median("fused_gemm", variants["fused_gemm"])  # records its events around the GEMM inside
    chosen = pick({name: [times[name]] for name in STRATEGIES})[0]  # one round: each variant's median
    if chosen != "bulk":  # the dispatcher's rule decides on the runs above; fresh runs check it against bulk
        times["auto"] = median(f"auto ({chosen})", around(variants[chosen]))
    times["bulk_again"] = median("bulk again", around(variants["bulk"]))
    if status.any():
        raise AssertionError(f"{label}: a fused wait gave up: status {status.tolist()}")
    return times, chosen


def link_rates(nbytes: int = 1 << 30) -> dict[str, float]:
    """Bytes per second the regimes' links reach here, measured once per run: a device-local copy
    (bytes read plus written: ``d2d``), pinned host to device (``h2d``), device to pinned host (``d2h``)."""
    device = torch.device("cuda", torch.cuda.current_device())
    on_device, pinned = torch.empty(nbytes, dtype=torch.uint8, device=device), torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    h2d = nbytes / median_time(lambda: on_device.copy_(pinned, non_blocking=True), device, iters=3)
    d2h = nbytes / median_time(lambda: pinned.copy_(on_device, non_blocking=True), device, iters=3)
    return {"d2d": copy_rate(device, nbytes), "h2d": h2d, "d2h": d2h}


class Delay:
    """Held (``held()``, while checking), ``hold(stream)`` queues a ~10 ms sleep on ``stream``: the
    copies a GEMM waits for (AG), or the GEMM whose signals the copies wait for (RS, AR), come late,
    so a wait that passes early lets its reader see the NaN poison instead of the right data."""

    CYCLES = 20_000_000

    def __init__(self):
        self.cycles = 0

    @contextlib.contextmanager
    def held(self):
        self.cycles = self.CYCLES
        try:
            yield
        finally:
            self.cycles = 0

    def hold(self, stream) -> None:
        if self.cycles:
            with torch.cuda.stream(stream):
                torch.cuda._sleep(self.cycles)


def _between(start, end, launch):
    """``launch()`` between ``start`` and ``end`` events when given (the GEMM inside a fused run)."""
    if start is not None:
        start.record()
    result = launch()
    if end is not None:
        end.record()
    return result


def _after(event, *streams) -> None:
    for stream in streams:
        stream.wait_event(event)


def _join(cur, *streams) -> None:
    for stream in streams:
        cur.wait_stream(stream)


def _variants(reference, triton_gemm, hooked, comm, bulk, chunked, fused, landing: list[torch.Tensor], sent: list[torch.Tensor],
              fused_gemm=None) -> dict:  # fmt: skip
    """The timed variants (``hooked``: fused's GEMM alone, with its plan and hooks, nothing to wait
    for and nobody waiting; ``fused_gemm(start, end)``: a run recording its events around the GEMM
    under overlap, by default ``fused``'s); ``poison``: NaN into the ``landing`` buffers (where data
    arrives, this rank's or its peers'); ``sent``: the buffers standing in for the peers' (what this
    rank sent)."""
    def poison():
        for t in landing + sent:
            t.fill_(float("nan"))

    return {"gemm": reference, "gemm_triton": triton_gemm, "gemm_hooked": hooked, "comm": comm, "bulk": bulk, "chunked": chunked,
            "fused": fused, "fused_gemm": fused_gemm or fused, "poison": poison, "sent": sent}  # fmt: skip


def _peers(count: int, rows: int, cols: int, dtype: torch.dtype, regime: str) -> list[torch.Tensor]:
    """Buffers standing in for peers: device memory (d2d) or pinned host memory (host, over PCIe)."""
    if regime == "d2d":
        return [torch.randn(rows, cols, device="cuda", dtype=dtype) for _ in range(count)]
    pinned = [torch.empty(rows, cols, dtype=dtype, pin_memory=True) for _ in range(count)]
    for t in pinned:  # drawn on the GPU: a CPU draws GBs of normals slowly
        t.copy_(torch.randn(rows, cols, device="cuda", dtype=dtype))
    return pinned


def _all_gather(shape: dict, regime: str, world: int, dtype: torch.dtype, status: torch.Tensor, delay: Delay) -> dict:
    """Peers' shards come in on one stream, after this rank's own rows are copied into the gathered
    buffer as the operator publishes them, while this rank's shard goes out to each peer on another."""
    m, n_out, k, cur = shape["M"], shape["N"] // world, shape["K"], torch.cuda.current_stream()
    n = m // world
    gathered, own = torch.empty(m, k, device="cuda", dtype=dtype), torch.randn(n, k, device="cuda", dtype=dtype)
    y = torch.empty(m, n_out, device="cuda", dtype=dtype)  # chunked's and fused's output: poisoned, so a skipped tile shows
    w = torch.randn(n_out, k, device="cuda", dtype=dtype) / k**0.5
    peers, outgoing = _peers(world - 1, n, k, dtype, regime), _peers(world - 1, n, k, dtype, regime)
    copy, send = new_stream(cur.device), new_stream(cur.device)
    rows = [gathered[q * n : (q + 1) * n] for q in range(world)]
    chunks = [(rows[0], own)] + [(rows[q + 1], peers[q]) for q in range(world - 1)]  # own rows first: the GEMM starts there
    flags, epochs = torch.zeros(world, dtype=torch.int32, device="cuda"), itertools.count(1)
    epoch = torch.zeros(1, dtype=torch.int32, device="cuda")  # a tensor: an int would be filled into one inside the timing
    plan = plan_for(gathered, w)
    waiting_plan = leave_sms(plan, gathered.device, 1)  # as the library's AG+GEMM: an SM for the copies it waits on
    raised, quiet = torch.ones(world, dtype=torch.int32, device="cuda"), torch.zeros_like(status)  # for hooked(): no allocation inside a timing

    def send_own():  # outbound, needing nothing but this rank's shard
        send.wait_stream(cur)
        signals.copy_chunks([(out, own) for out in outgoing], stream=send)

    def comm():
        send_own()
        copy.wait_stream(cur)
        signals.copy_chunks(chunks, stream=copy)
        _join(cur, copy, send)

    def bulk():
        comm()
        return gathered @ w.T

    def chunked():
        send_own()
        copy.wait_stream(cur)
        delay.hold(copy)
        events = []
        with torch.cuda.stream(copy):
            for dst, src in chunks[1:]:  # the peers' rows: its own it reads where they are
                dst.copy_(src, non_blocking=True)
                events.append(torch.cuda.Event())
                events[-1].record(copy)
        torch.matmul(own, w.T, out=y[:n])  # own rows first, while the first chunk travels
        for q, event in enumerate(events, start=1):
            cur.wait_event(event)
            torch.matmul(rows[q], w.T, out=y[q * n : (q + 1) * n])
        cur.wait_stream(send)
        return y

    def fused(start=None, end=None):
        e = next(epochs)
        epoch.fill_(e)
        send_own()
        copy.wait_stream(cur)
        delay.hold(copy)  # checking: the GEMM's waits must hold it until the rows land
        signals.copy_chunks(chunks, flags, list(range(world)), e, stream=copy)
        _between(start, end, lambda: gemm(gathered, w, out=y, wait=WaitHook(flags, epoch, n), start_chunk=0, plan=waiting_plan,
                                          check=False, status=status, wait_timeout=WAIT_TIMEOUT_S))  # fmt: skip
        _join(cur, copy, send)
        return y

    def hooked():  # every flag raised already (>= epoch 1)
        return gemm(gathered, w, out=y, wait=WaitHook(raised, raised[:1], n), start_chunk=0, plan=waiting_plan, check=False, status=quiet)

    def beside_copies(start, end):  # the GEMM slowed by the copies beside it, not waiting for them (timed only)
        send_own()
        copy.wait_stream(cur)
        signals.copy_chunks(chunks, stream=copy)
        _between(start, end, hooked)
        _join(cur, copy, send)

    return _variants(lambda: gathered @ w.T, lambda: gemm(gathered, w, plan=plan), hooked, comm, bulk, chunked, fused, [gathered, y],
                     outgoing, fused_gemm=beside_copies)  # fmt: skip


def _reduce_scatter(shape: dict, regime: str, world: int, dtype: torch.dtype, status: torch.Tensor, delay: Delay) -> dict:
    """Block q of the partial goes out to rank q while peer q's block of this rank's rows comes in,
    on two streams (a link carries both directions at once). Ranks run in lockstep: a peer has its
    block for this rank when this rank has finished its block at the same step of its walk, so the
    exchange of step q follows this rank's block q (walk 1, 2, ..., W-1, then its own block 0)."""
    m, n_out, k = shape["M"], shape["N"], shape["K"] // world
    n = m // world
    x, w = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(n_out, k, device="cuda", dtype=dtype) / k**0.5
    partial, staging = torch.empty(m, n_out, device="cuda", dtype=dtype), torch.empty(world - 1, n, n_out, device="cuda", dtype=dtype)
    outgoing, incoming = _peers(world - 1, n, n_out, dtype, regime), _peers(world - 1, n, n_out, dtype, regime)
    blocks = [slice(q * n, (q + 1) * n) for q in range(world)]

    def exchange(q, send, receive):  # step q: block q out, a peer's block of this rank's rows in
        signals.copy_chunks([(outgoing[q - 1], partial[blocks[q]])], stream=send)
        signals.copy_chunks([(staging[q - 1], incoming[q - 1])], stream=receive)

    def finish():  # as the operator does: one pass over this rank's block and the received ones
        out = torch.empty(n, n_out, device="cuda", dtype=dtype)
        reduce_into([partial[blocks[0]], *staging], "sum", out)
        return out

    return _by_row_chunks(x, w, partial, blocks, exchange, finish, status, delay, [partial, staging], outgoing, start_chunk=1, own=0)


def _all_reduce(shape: dict, regime: str, world: int, dtype: torch.dtype, status: torch.Tensor, delay: Delay,
                chunks: int = ROW_CHUNKS) -> dict:  # fmt: skip
    """One-shot: every peer's partial comes in, and this rank's goes out to every peer (W-1 copies
    of it), chunk by chunk as the ranks finish it in lockstep, on two streams as in _reduce_scatter."""
    m, n_out, k = shape["M"], shape["N"], shape["K"] // world
    spans = _spans(m, chunks)
    x, w = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(n_out, k, device="cuda", dtype=dtype) / k**0.5
    partial, staging = torch.empty(m, n_out, device="cuda", dtype=dtype), torch.empty(world - 1, m, n_out, device="cuda", dtype=dtype)
    outgoing, incoming = _peers(world - 1, m, n_out, dtype, regime), _peers(world - 1, m, n_out, dtype, regime)

    def exchange(c, send, receive):
        span = spans[c]
        signals.copy_chunks([(outgoing[i][span], partial[span]) for i in range(world - 1)], stream=send)
        signals.copy_chunks([(staging[i, span], incoming[i][span]) for i in range(world - 1)], stream=receive)

    def finish():  # as the operator does: one pass over the parts, after every pull
        out = torch.empty(m, n_out, device="cuda", dtype=dtype)
        reduce_into([partial, *staging], "sum", out)
        return out

    return _by_row_chunks(x, w, partial, spans, exchange, finish, status, delay, [partial, staging], outgoing)


def _all_reduce_two_shot(shape: dict, regime: str, world: int, dtype: torch.dtype, status: torch.Tensor, delay: Delay,
                         chunks: int = ROW_CHUNKS) -> dict:  # fmt: skip
    """Two-shot, chunk by chunk as the ranks finish it in lockstep (this rank is rank 0): piece q of
    the chunk goes out to rank q while the peers' pieces of this rank's rows come in; their sum (a
    kernel, on the SMs a fused GEMM leaves free) is written back over this rank's piece, as the
    operator publishes it, then goes out to every peer while the peers' sums come in. Two streams,
    as in _reduce_scatter; 2(W-1)/W of the output each way."""
    m, n_out, k = shape["M"], shape["N"], shape["K"] // world
    x, w = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(n_out, k, device="cuda", dtype=dtype) / k**0.5
    partial, y = torch.empty(m, n_out, device="cuda", dtype=dtype), torch.empty(m, n_out, device="cuda", dtype=dtype)

    def piece(span: slice, owner: int) -> slice:
        a, b = span.start, span.stop
        return slice(a + (b - a) * owner // world, a + (b - a) * (owner + 1) // world)

    spans = _spans(m, chunks)
    widest = max(piece(span, 0).stop - piece(span, 0).start for span in spans)
    staging = torch.empty(world - 1, widest, n_out, device="cuda", dtype=dtype)
    outgoing, incoming = _peers(world - 1, m, n_out, dtype, regime), _peers(world - 1, m, n_out, dtype, regime)

    def exchange(c, send, receive):
        mine, theirs = piece(spans[c], 0), [piece(spans[c], q) for q in range(1, world)]
        staged = [staging[i, : mine.stop - mine.start] for i in range(world - 1)]
        signals.copy_chunks([(outgoing[i][rows], partial[rows]) for i, rows in enumerate(theirs)], stream=send)
        signals.copy_chunks([(staged[i], incoming[i][mine]) for i in range(world - 1)], stream=receive)
        with torch.cuda.stream(receive):
            reduce_into([partial[mine], *staged], "sum", y[mine])
        signals.copy_chunks([(partial[mine], y[mine])], stream=receive)
        send.wait_event(receive.record_event())
        signals.copy_chunks([(outgoing[i][mine], y[mine]) for i in range(world - 1)], stream=send)
        signals.copy_chunks([(y[rows], incoming[i][rows]) for i, rows in enumerate(theirs)], stream=receive)

    # the fused GEMM leaves SMs free for the reductions, as the operator's does
    return _by_row_chunks(x, w, partial, spans, exchange, lambda: y, status, delay, [partial, staging, y], outgoing,
                          spare_sms=REDUCE_SMS)  # fmt: skip


def _spans(m: int, chunks: int) -> list[slice]:
    """At most ``chunks`` row chunks, none empty, cut as the operators cut them (5 rows in 4 chunks: 2, 2, 1)."""
    step = chunk_rows_for(m, chunks)
    return [slice(a, min(a + step, m)) for a in range(0, m, step)]


def _by_row_chunks(x, w, partial, spans, exchange, finish, status, delay, landing, sent, *, spare_sms=0, start_chunk=0,
                   own=None) -> dict:  # fmt: skip
    """The variants of a GEMM whose communication goes row chunk by row chunk (``spans``), in
    lockstep: the GEMM walks the chunks from ``start_chunk`` on, around; once this rank has chunk
    c of ``partial``, ``exchange(c, send, receive)`` queues its copies on two streams (all but
    ``own``, a chunk that stays); ``finish()`` (after both) returns the result."""
    cur = torch.cuda.current_stream()
    walk = [(start_chunk + i) % len(spans) for i in range(len(spans))]
    exchanged = [c for c in walk if c != own]
    send, receive = new_stream(cur.device), new_stream(cur.device)
    counters, epochs = torch.zeros(len(spans), dtype=torch.int32, device="cuda"), itertools.count(1)
    plan = plan_for(x, w)
    fused_plan = leave_sms(plan, x.device, spare_sms)
    step = spans[0].stop - spans[0].start
    outputs = chunk_outputs(partial.shape[0], partial.shape[1], step)

    def joined():
        _join(cur, send, receive)
        return finish()

    def comm():
        _after(cur.record_event(), send, receive)
        for c in exchanged:
            exchange(c, send, receive)
        return joined()

    def bulk():
        torch.matmul(x, w.T, out=partial)
        return comm()

    def chunked():
        for c in walk:  # peers' chunks first (from start_chunk), so they can leave early
            torch.matmul(x[spans[c]], w.T, out=partial[spans[c]])
            if c != own:
                _after(cur.record_event(), send, receive)  # peers finish this chunk when this rank does (lockstep)
                exchange(c, send, receive)
        return joined()

    def fused(start=None, end=None):
        e, before = next(epochs), cur.record_event()
        delay.hold(cur)  # checking: the copies' stream waits must hold them until the GEMM has signalled
        _between(start, end, lambda: gemm(x, w, out=partial, signal=SignalHook(counters, step), start_chunk=start_chunk, plan=fused_plan,
                                          status=status))  # fmt: skip
        _after(before, send, receive)  # waits queued after the GEMM they wait for (shared hardware queues)
        for c in exchanged:
            for stream in (send, receive):  # stream waits on the GEMM's signal counters
                signals.wait(counters, c, e * outputs[c], stream)
            exchange(c, send, receive)
        return joined()

    idle, quiet = torch.zeros_like(counters), torch.zeros_like(status)  # counters nobody waits on

    def hooked():
        return gemm(x, w, out=partial, signal=SignalHook(idle, step), start_chunk=start_chunk, plan=fused_plan, status=quiet)

    return _variants(lambda: x @ w.T, lambda: gemm(x, w, plan=plan), hooked, comm, bulk, chunked, fused, landing, sent)
