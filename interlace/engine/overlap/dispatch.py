"""The dispatcher behind ``overlap="auto"``: bulk, chunked or fused, from costs measured once.

Per case (pattern, per-rank GEMM shape, dtype, world size, transport, topology, and whether
fused calls are checked: a checked call blocks the host until it is done) every rank times
every candidate the ranks agree can run, in lockstep, and the slowest rank's time counts, so all
ranks decide the same. Candidates are timed in ``ROUNDS`` interleaved rounds (a drift of the
clocks or of other work touches them all alike): one replaces bulk only when its median beats
bulk's by ``MARGIN`` and it was faster than bulk in every round, so noise alone hardly ever
picks a strategy that is not faster (``pick``). Decisions are cached in memory and on disk
(``$INTERLACE_DISPATCH_CACHE``, default ``~/.cache/interlace/dispatch.json``). A cached decision
serves when it was made by these versions, weighed every candidate there is now, can run here,
and every rank holds the same one (else all measure again), so ranks never diverge; that
agreement is collective once per group and case, then remembered: later calls cost nothing, and
may be captured in a CUDA graph. ``decide()`` and ``explain()`` are collective on a case's first
use in a group. ``explain()`` says what a call will use and why, including why fused was left out.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from interlace.engine.comm import Group
from interlace.engine.comm.symmetric import all_or_none
from interlace.engine.device import drain_within

from .config import OverlapConfig

MARGIN = 0.02
# A candidate no faster than bulk is faster in all of 7 interleaved rounds with odds of 1 in 128
ROUNDS = 7
PATTERNS = ("ag_gemm", "gemm_rs", "gemm_ar")
STRATEGIES = ("bulk", "chunked", "fused")  # what a decision configures
LABELS = ("bulk", "chunked", "chunkedx2", "chunkedx4", "fused", "fused-two-shot")  # every candidate, in one order


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
        return cls(pattern, m, n, k, str(dtype).removeprefix("torch."), group.world_size, transport, topology(group), checked)


@dataclass
class Decision:
    strategy: str
    chunks: int
    times: dict[str, float]
    why: str
    measured: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    shots: int = 1  # fused GEMM+AR: one-shot or two-shot (decisions cached before it existed are one-shot)
    versions: str = ""  # what measured it (``versions()``): a decision of other code is measured again

    def __post_init__(self):  # a cache entry is checked here: one that cannot configure a call is refused at load
        self.config()  # OverlapConfig refuses chunks and shots it cannot run (ValueError)
        times_ok = isinstance(self.times, dict) and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in self.times.values())
        if self.strategy not in STRATEGIES or not times_ok:  # "auto" configures a call, but is no decision
            raise ValueError(f"not a decision: strategy {self.strategy!r}, times {self.times!r}")

    def config(self) -> OverlapConfig:
        return OverlapConfig(strategy=self.strategy, chunks=self.chunks, shots=self.shots)

    def label(self) -> str:
        return self.strategy + {"chunked": f" x{self.chunks}", "fused": " (two-shot)" if self.shots == 2 else ""}.get(self.strategy, "")


# A timer for a case: made once per decision (its inputs allocated), then called for every
# candidate in every round, returning seconds per call (the slowest rank's, the same on every rank).
Measure = Callable[[Group, Case], Callable[[OverlapConfig], float]]


class Dispatcher:
    def __init__(self, path: str | Path | None = None, measure: Measure | None = None, rounds: int = ROUNDS):
        default = os.environ.get("INTERLACE_DISPATCH_CACHE", str(Path.home() / ".cache" / "interlace" / "dispatch.json"))
        self.path = Path(path if path is not None else default)
        if not (isinstance(rounds, int) and rounds >= 1):
            raise ValueError(f"Dispatcher: rounds must be a positive int, got {rounds!r}")
        self.measure, self.rounds = measure or measure_collectively, rounds
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
        candidates, left_out = candidates_for(group, case)
        cached = _usable(group, case, self.decisions.get(case.key()), candidates)
        if not _agreed(group, cached):
            cached = self._measure(group, case, candidates, left_out)
            self.decisions[case.key()] = cached
            _store(self.path, case.key(), cached)
        agreed[case.key()] = cached
        return cached

    def explain(self, group: Group, case: Case) -> str:
        """What calls of ``case`` use, and why. Collective while the case is undecided in ``group``."""
        d = self.decide(group, case)
        times = ", ".join(f"{label} {t * 1e3:.3f} ms" for label, t in sorted(d.times.items(), key=lambda kv: kv[1]))
        return f"{case.key()}: {d.label()} ({d.why}); measured {times} on {d.measured}; cache {self.path}"

    def _measure(self, group: Group, case: Case, candidates: dict[str, OverlapConfig], left_out: str | None) -> Decision:
        timer = self.measure(group, case)
        samples: dict[str, list[float]] = {label: [] for label in candidates}
        for _ in range(self.rounds):
            for label, config in candidates.items():
                samples[label].append(timer(config))
        label, why = pick(samples)
        if left_out:
            why += f"; {left_out}"
        chosen, times = candidates[label], {label: statistics.median(s) for label, s in samples.items()}
        return Decision(chosen.strategy, chosen.chunks, times, why, shots=chosen.shots, versions=versions())


def pick(samples: dict[str, list[float]]) -> tuple[str, str]:
    """The label to use among timed ``samples`` (seconds per call, one per interleaved round;
    ``bulk`` among them), and why: of the candidates faster than bulk in every round and by at
    least ``MARGIN`` at the median, the fastest at the median; else bulk."""
    bulk, rounds = samples["bulk"], len(samples["bulk"])
    median = {label: statistics.median(s) for label, s in samples.items()}
    if not median["bulk"] > 0:
        raise ValueError(f"bulk must take a positive time to compare against, got {median['bulk']} s")

    def gain(label: str) -> float:
        return 1 - median[label] / median["bulk"]

    def faster_in(label: str) -> int:
        return sum(t < b for t, b in zip(samples[label], bulk))

    winners = [label for label in samples if label != "bulk" and gain(label) >= MARGIN and faster_in(label) == rounds]
    if winners:
        label = min(winners, key=median.get)
        return label, f"{gain(label):.0%} faster than bulk (median of {rounds} rounds, faster in each)"
    best = min(samples, key=median.get)
    if best == "bulk":
        return "bulk", "bulk was fastest"
    if gain(best) < MARGIN:
        return "bulk", f"nothing beat bulk by {MARGIN:.0%}"
    return "bulk", f"{best} was {gain(best):.0%} faster at the median but faster in only {faster_in(best)} of {rounds} rounds"


@functools.lru_cache(maxsize=None)
def versions() -> str:
    """What a decision depends on besides its case: the code that was timed."""
    from interlace import __version__

    parts = [f"interlace {__version__}", f"torch {torch.__version__}"]
    try:
        parts.append(f"triton {importlib.metadata.version('triton')}")
    except importlib.metadata.PackageNotFoundError:
        pass
    return ", ".join(parts)


def _usable(group: Group, case: Case, decision: Decision | None, candidates: dict[str, OverlapConfig]) -> Decision | None:
    """``decision`` if it holds here, else None (it is measured again): made by these versions,
    having weighed every candidate there is now (one that became available is timed), and able to
    run on ``group`` (fused, from a cache shared between machines, may not)."""
    if decision is None or decision.versions != versions() or not set(candidates) <= set(decision.times):
        return None
    if decision.strategy != "fused":
        return decision
    from .fused import fused_unavailable

    return None if fused_unavailable(group, case.pattern, shots=decision.shots) else decision


def _agreed(group: Group, decision: Decision | None) -> bool:
    """True when every rank holds the same cached decision (caches are per machine: they can differ)."""
    code = -1.0 if decision is None else float((STRATEGIES.index(decision.strategy) * 10 + decision.shots) * 1000 + decision.chunks)
    low = group.all_reduce(torch.tensor([code], dtype=torch.float64, device=group.device), "max")
    high = group.all_reduce(torch.tensor([-code], dtype=torch.float64, device=group.device), "max")
    return code >= 0 and low.item() == -high.item() == code


def candidates_for(group: Group, case: Case) -> tuple[dict[str, OverlapConfig], str | None]:
    """Strategies to time (label -> config), and what was left out and why (or None). Collective:
    only what every rank can run (that may hang on a process's own settings, such as the Triton
    interpreter): ranks timing different candidates would pair different collectives."""
    configs, why_not = _candidates_here(group, case)
    assert set(configs) <= set(LABELS), f"a candidate outside LABELS would skip the agreement: {sorted(configs)}"
    notes = [f"fused not considered: {why_not}"] if why_not else []
    mine = torch.tensor([[label in configs for label in LABELS]], dtype=torch.uint8, device=group.device)
    everyone = group.all_gather(mine).tolist()
    for i, label in enumerate(LABELS):
        lacking = [r for r, row in enumerate(everyone) if not row[i]]
        if 0 < len(lacking) < group.world_size:  # said alike on every rank, whether it lacks it or not
            configs.pop(label, None)
            notes.append(f"{label} left out: rank(s) {lacking} cannot time it")
    return configs, "; ".join(notes) or None


def _candidates_here(group: Group, case: Case) -> tuple[dict[str, OverlapConfig], str | None]:
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


def measure_collectively(group: Group, case: Case, iters: int = 5) -> Callable[[OverlapConfig], float]:
    """A timer for ``case``: its inputs made once (a rank that cannot make them, out of memory
    say, fails every rank at once instead of leaving its peers waiting), then seconds per call
    under a config: every rank times ``iters`` calls after one untimed call, the slowest counts."""
    failure = None
    try:
        call = _call_of(group, case)
    except (RuntimeError, MemoryError) as error:
        failure = f"{type(error).__name__}: {error}"
    all_or_none(group, failure, f"making the inputs to time {case.key()}")
    dev = group.device

    def timer(config: OverlapConfig) -> float:
        call(config)
        drain_within(dev, group.timeout, f"rank {group.rank}: warming up {config.strategy} for {case.key()}")
        group.barrier()
        stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
        first = stream.record_event(torch.cuda.Event(enable_timing=True)) if stream else None
        start = None if stream else time.perf_counter()
        for _ in range(iters):
            call(config)
        last = stream.record_event(torch.cuda.Event(enable_timing=True)) if stream else None
        drain_within(dev, group.timeout, f"rank {group.rank}: timing {config.strategy} for {case.key()}")
        # on a GPU, its own clock: the host notices the end by polling, late by up to a sleep of ~0.1 ms,
        # which would be much of a decode call's time; a host waiting inside a call still counts
        elapsed = (first.elapsed_time(last) / 1e3 if stream else time.perf_counter() - start) / iters
        if config.strategy == "fused":  # every rank raises together: a timed call whose wait gave up must not count as a fast one
            from .fused import agreed_failure

            if gave_up := agreed_failure(group):
                raise RuntimeError(f"rank {group.rank}: timing fused for {case.key()} failed: {gave_up}")
        return group.all_reduce(torch.tensor([elapsed], dtype=torch.float64, device=dev), "max").item()

    return timer


def _call_of(group: Group, case: Case) -> Callable[[OverlapConfig], object]:
    """One call of ``case`` under a config, on inputs made here (rank-dependent, off the global RNG)."""
    from . import collective_matmul as cm

    dtype, dev, w = getattr(torch, case.dtype), group.device, case.world_size
    g = torch.Generator().manual_seed(1234 + group.rank)
    weight = (torch.randn(case.n, case.k, generator=g) / case.k**0.5).to(dev, dtype)
    if case.pattern == "ag_gemm":
        x = torch.randn(case.m // w, case.k, generator=g).to(dev, dtype)
        return lambda config: cm.all_gather_matmul(x, [weight], group, config)
    x = torch.randn(case.m, case.k, generator=g).to(dev, dtype)
    run = cm.matmul_reduce_scatter if case.pattern == "gemm_rs" else cm.matmul_all_reduce
    return lambda config: run(x, weight, group, config)


_TOPOLOGY: dict[str, str] = {}


def topology(group: Group) -> str:
    """What the costs depend on beyond the call: the device model and count, and the hosts the
    group spans (where more than one)."""
    device, hosts = group.device, group.hosts
    key = str(device)
    if key not in _TOPOLOGY:
        if device.type != "cuda":
            _TOPOLOGY[key] = f"cpu{os.cpu_count()}"
        else:
            props = torch.cuda.get_device_properties(device)
            _TOPOLOGY[key] = f"{props.name.replace(' ', '_')}x{torch.cuda.device_count()}"
    return _TOPOLOGY[key] + (f"/{hosts}hosts" if hosts != 1 else "")


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
        except (AttributeError, TypeError, ValueError):  # not a decision this version can read: measured again
            continue
    return decisions


def _store(path: Path, key: str, decision: Decision) -> None:
    """Merge into the file atomically (concurrent ranks write the same decision). A file that
    cannot be written is warned about, and the decision holds for this process only: raising
    here, on the ranks whose disk refuses, would leave the others waiting in their next collective."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {k: asdict(v) for k, v in _load(path).items()}
        merged[key] = asdict(decision)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o644)  # as a plain write makes it (mkstemp's 0600 would hide a shared cache from its other users)
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"interlace: the dispatch cache {path} could not be written ({error}): {key} is decided for this "
                      "process only", RuntimeWarning, stacklevel=2)  # fmt: skip
