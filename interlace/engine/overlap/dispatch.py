"""The dispatcher behind ``overlap="auto"``: bulk, chunked or fused, from costs measured once.

Per case (pattern, per-rank GEMM shape, dtype, world size, transport, topology, and whether
fused calls are checked: a checked call blocks the host until it is done) every rank times
every available candidate in lockstep and the slowest rank's time counts, so all ranks decide the
same. The fastest wins, but bulk stays unless another is at least ``MARGIN`` faster: the choice is
never slower than bulk as measured. Decisions are cached in memory and on disk
(``$INTERLACE_DISPATCH_CACHE``, default ``~/.cache/interlace/dispatch.json``); a cached decision
is used only when every rank holds the same one (else all measure again), so ranks never diverge;
that agreement is collective once per group and case, then remembered: later calls cost nothing,
and may be captured in a CUDA graph. ``explain()`` says what a call will use and why, including
why fused was left out.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from interlace.engine.comm import Group
from interlace.engine.device import drain_within

from .config import OverlapConfig

MARGIN = 0.02
PATTERNS = ("ag_gemm", "gemm_rs", "gemm_ar")


@dataclass(frozen=True)
class Case:
    """One overlapped call. ``m, n, k``: the per-rank GEMM (rows of the full input, output and
    reduction features as this rank multiplies them). ``checked``: the caller's
    ``OverlapConfig.check``, which fused is timed with."""

    pattern: str
    m: int
    n: int
    k: int
    dtype: str
    world_size: int
    transport: str
    topology: str
    checked: bool = True

    def key(self) -> str:
        return (f"{self.pattern}|{self.m}x{self.n}x{self.k}|{self.dtype}|W{self.world_size}|{self.transport}|{self.topology}|"
                + ("checked" if self.checked else "unchecked"))  # fmt: skip

    @classmethod
    def of(cls, pattern: str, group: Group, m: int, n: int, k: int, dtype: torch.dtype, checked: bool = True) -> Case:
        transport = type(group).__name__ + (f"/{group.backend}" if hasattr(group, "backend") else "")
        return cls(pattern, m, n, k, str(dtype).removeprefix("torch."), group.world_size, transport, topology(group.device), checked)


@dataclass
class Decision:
    strategy: str
    chunks: int
    times: dict[str, float]
    why: str
    measured: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    shots: int = 1  # fused GEMM+AR: one-shot or two-shot (decisions cached before it existed are one-shot)

    def config(self) -> OverlapConfig:
        return OverlapConfig(strategy=self.strategy, chunks=self.chunks, shots=self.shots)

    def label(self) -> str:
        return self.strategy + {"chunked": f" x{self.chunks}", "fused": " (two-shot)" if self.shots == 2 else ""}.get(self.strategy, "")


Measure = Callable[[Group, Case, OverlapConfig], float]


class Dispatcher:
    def __init__(self, path: str | Path | None = None, measure: Measure | None = None):
        default = os.environ.get("INTERLACE_DISPATCH_CACHE", str(Path.home() / ".cache" / "interlace" / "dispatch.json"))
        self.path = Path(path if path is not None else default)
        self.measure = measure or measure_collectively
        self.decisions: dict[str, Decision] = _load(self.path)
        self._agreed: weakref.WeakKeyDictionary[Group, dict[str, Decision]] = weakref.WeakKeyDictionary()

    def config_for(self, group: Group, case: Case) -> OverlapConfig:
        return self.decide(group, case).config()

    def decide(self, group: Group, case: Case) -> Decision:
        """Collective on first use of a case in a group (every rank must call it with the same case)."""
        agreed = self._agreed.setdefault(group, {})
        if case.key() in agreed:
            return agreed[case.key()]
        if group.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"rank {group.rank}: overlap='auto' decides {case.key()} collectively on its first call "
                               "(it may measure): make that call once before capturing a CUDA graph")  # fmt: skip
        cached = _runnable(group, case, self.decisions.get(case.key()))
        if not _agreed(group, cached):
            cached = self._measure(group, case)
            self.decisions[case.key()] = cached
            _store(self.path, case.key(), cached)
        agreed[case.key()] = cached
        return cached

    def explain(self, group: Group, case: Case) -> str:
        d = self.decide(group, case)
        times = ", ".join(f"{label} {t * 1e3:.3f} ms" for label, t in sorted(d.times.items(), key=lambda kv: kv[1]))
        return f"{case.key()}: {d.label()} ({d.why}); measured {times} on {d.measured}; cache {self.path}"

    def _measure(self, group: Group, case: Case) -> Decision:
        candidates, excluded = candidates_for(group, case)
        times = {label: self.measure(group, case, config) for label, config in candidates.items()}
        # bulk again, last: the first run may meet a GPU still clocking up; the faster counts, so that
        # a pick must beat bulk at its best
        times["bulk"] = min(times["bulk"], self.measure(group, case, candidates["bulk"]))
        label, why = pick(times)
        if excluded:
            why += f"; fused not considered: {excluded}"
        chosen = candidates[label]
        return Decision(chosen.strategy, chosen.chunks, times, why, shots=chosen.shots)


def pick(times: dict[str, float]) -> tuple[str, str]:
    """The label to use among measured ``times`` (seconds; ``bulk`` among them), and why: the
    fastest, unless it beats bulk by less than ``MARGIN`` (then bulk)."""
    bulk = times["bulk"]
    label = min(times, key=times.get)
    if times[label] > bulk * (1 - MARGIN):
        return "bulk", f"nothing beat bulk by {MARGIN:.0%}" if label != "bulk" else "bulk was fastest"
    return label, f"{(1 - times[label] / bulk):.0%} faster than bulk"


def _runnable(group: Group, case: Case, decision: Decision | None) -> Decision | None:
    """``decision``, or None when it is fused and cannot run on ``group`` (a cache shared between
    machines, or a key that does not say whether ranks share memory): it is measured again. Alike
    on every rank: it depends on the group only."""
    if decision is None or decision.strategy != "fused":
        return decision
    from .fused import fused_unavailable

    return None if fused_unavailable(group, case.pattern, shots=decision.shots) else decision


def _agreed(group: Group, decision: Decision | None) -> bool:
    """True when every rank holds the same cached decision (caches are per machine: they can differ)."""
    code = -1.0 if decision is None else float((["bulk", "chunked", "fused"].index(decision.strategy) * 10 + decision.shots) * 1000 + decision.chunks)
    low = group.all_reduce(torch.tensor([code], dtype=torch.float64, device=group.device), "max")
    high = group.all_reduce(torch.tensor([-code], dtype=torch.float64, device=group.device), "max")
    return code >= 0 and low.item() == -high.item() == code


def candidates_for(group: Group, case: Case) -> tuple[dict[str, OverlapConfig], str | None]:
    """Strategies to time (label -> config), and why fused is not among them (or None)."""
    configs = {"bulk": OverlapConfig(strategy="bulk")}
    chunk_counts = [0] if case.pattern == "ag_gemm" else [2, 4]  # AG's chunked is a ring: one chunk per rank
    for c in chunk_counts:
        configs["chunked" + (f"x{c}" if c else "")] = OverlapConfig(strategy="chunked", chunks=max(c, 1))
    from .fused import fused_unavailable  # fused imports the GEMM: only when deciding

    why_not = fused_unavailable(group, case.pattern, timing=True)
    if why_not is None:
        # timed as it will run: a checked call's host sync costs most where calls are short (decode)
        configs["fused"] = OverlapConfig(strategy="fused", chunks=4, check=case.checked)
        # two-shot moves 2(W-1)/W of the output where one-shot moves W-1 times it: the same at W = 2
        if case.pattern == "gemm_ar" and case.world_size > 2 and fused_unavailable(group, "gemm_ar", timing=True, shots=2) is None:
            configs["fused-two-shot"] = OverlapConfig(strategy="fused", chunks=4, shots=2, check=case.checked)
    return configs, why_not


def measure_collectively(group: Group, case: Case, config: OverlapConfig, iters: int = 5) -> float:
    """Seconds per call of ``case`` under ``config``: every rank times it, the slowest counts."""
    from . import collective_matmul as cm

    dtype, dev, w = getattr(torch, case.dtype), group.device, case.world_size
    g = torch.Generator().manual_seed(1234 + group.rank)
    weight = (torch.randn(case.n, case.k, generator=g) / case.k**0.5).to(dev, dtype)
    if case.pattern == "ag_gemm":
        x = torch.randn(case.m // w, case.k, generator=g).to(dev, dtype)
        fn = lambda: cm.all_gather_matmul(x, [weight], group, config)  # noqa: E731
    else:
        x = torch.randn(case.m, case.k, generator=g).to(dev, dtype)
        run = cm.matmul_reduce_scatter if case.pattern == "gemm_rs" else cm.matmul_all_reduce
        fn = lambda: run(x, weight, group, config)  # noqa: E731
    fn()
    drain_within(group.device, group.timeout, f"rank {group.rank}: warming up {config.strategy} for {case.key()}")
    group.barrier()
    stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
    first = stream.record_event(torch.cuda.Event(enable_timing=True)) if stream else None
    start = None if stream else time.perf_counter()
    for _ in range(iters):
        fn()
    last = stream.record_event(torch.cuda.Event(enable_timing=True)) if stream else None
    drain_within(group.device, group.timeout, f"rank {group.rank}: timing {config.strategy} for {case.key()}")
    # on a GPU, its own clock: the host notices the end by polling, late by up to a sleep of ~0.1 ms,
    # which would be much of a decode call's time; a host waiting inside a call still counts
    elapsed = (first.elapsed_time(last) / 1e3 if stream else time.perf_counter() - start) / iters
    if config.strategy == "fused":  # every rank raises together: a timed call whose wait gave up must not count as a fast one
        from .fused import agreed_failure

        if failure := agreed_failure(group):
            raise RuntimeError(f"rank {group.rank}: timing fused for {case.key()} failed: {failure}")
    return group.all_reduce(torch.tensor([elapsed], dtype=torch.float64, device=dev), "max").item()


_TOPOLOGY: dict[str, str] = {}


def topology(device: torch.device) -> str:
    """What the costs depend on beyond the call: the device model and count."""
    if device.type != "cuda":
        return f"cpu{os.cpu_count()}"
    key = str(device)
    if key not in _TOPOLOGY:
        props = torch.cuda.get_device_properties(device)
        _TOPOLOGY[key] = f"{props.name.replace(' ', '_')}x{torch.cuda.device_count()}"
    return _TOPOLOGY[key]


_DEFAULT: Dispatcher | None = None
_DEFAULT_LOCK = threading.Lock()


def default_dispatcher() -> Dispatcher:
    """The process's dispatcher. Made once under a lock: rank threads (LocalGroup) making one each
    would record their agreements in different ones, and then disagree on which calls are collective."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Dispatcher()
        return _DEFAULT


def _load(path: Path) -> dict[str, Decision]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    known = {f.name for f in fields(Decision)}  # a file written by another version may hold more, or less
    decisions = {}
    for key, entry in raw.items() if isinstance(raw, dict) else ():
        try:
            decisions[key] = Decision(**{name: value for name, value in entry.items() if name in known})
        except (AttributeError, TypeError):  # not a decision this version can read: measured again
            continue
    return decisions


def _store(path: Path, key: str, decision: Decision) -> None:
    """Merge into the file atomically (concurrent ranks write the same decision)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {k: asdict(v) for k, v in _load(path).items()}
    merged[key] = asdict(decision)
    tmp = path.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    os.replace(tmp, path)
