"""One lent-GPU session in one command: set up, test file by file, measure, pack the results.

A lent GPU comes for minutes, one command of at most ten minutes at a time, on a fresh machine
with no network; a stuck CUDA stream wait can wedge a process for good. So every step here is
its own process group with its own time limit, cut to what the session's budget has left, and
a step that overruns is killed (a killed process frees its CUDA context) and named; the steps
after it still run. Standard library only.

    python3 tools/gpu_session.py --plan check   --out $OUT --budget 560   # set-up, env, GPU tests
    python3 tools/gpu_session.py --plan measure --out $OUT --budget 560   # set-up, env, benchmarks, report
    python3 tools/gpu_session.py --plan all --steps test-rest,bench-gemm --out $OUT   # set-up and the steps named

Under ``--out``: ``session.log`` (every step's output, headed by its command), ``summary.json``
(per step: command, exit code, seconds, whether it was cut off or skipped and why) and
``results.tar.gz`` (``bench/results/<machine>/``, to unpack at the repository root and commit:
the envelope ``env.json``, each test step's JUnit XML under ``tests/``, each benchmark's JSON and
the report), packed again after every step, so a session killed from outside still brings back
what it did. Set-up is required to succeed, and so is ``env``, which fails unless torch sees a
GPU and the extension was built with CUDA: without those every GPU test would skip. The kernels
compiled in this call come back too (``triton-cache.tar.gz``, the newest within 48 MiB): unpacked into
``.triton-cache/`` here, beside those of earlier calls, and named in the next call's carry, that
call compiles nothing already compiled (each call may get a fresh machine). The device copy of
the repository has no ``.git``: set ``INTERLACE_COMMIT`` to the commit sent, and the result
envelopes record it. Where the device's Python has no headers (no python3-dev), the build and
Triton's launcher use those carried in ``.pyheaders/python3.X`` (copied from a Python of that
version elsewhere; an ignored folder, named in the call's carry). Steps named with ``--steps``
run in the order named, after set-up and env.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = ".venv/bin/python"
# -v: each test named as it starts (a killed run's log ends at the one that hung); a stuck test dumps
# every thread's stack; failures reported as they happen (tests/conftest.py), not only at the end
# --tb=short: session.log comes back whole only under 16 MiB, even when hundreds of tests fail
PYTEST = [PY, "-m", "pytest", "-v", "--tb=short", "-o", "timeout_method=thread"]
LEAST = 30.0  # seconds a step needs at least to be worth starting
FIRST = ("test_symmetric.py", "test_gemm.py", "test_reduce.py", "test_fused.py")  # run alone, in this order, before the rest
CONFORMANCE = "test_comm_conformance.py"
LAYERS = ["--backends", "local", "--world-sizes", "2,4,8"]  # one process, a stream per rank: timeable on one GPU


@dataclass
class Step:
    name: str
    argv: list[str]
    limit: float
    required: bool = False  # the session stops if it fails (set-up)
    defaults: dict[str, str] = field(default_factory=dict)  # environment variables, unless the session's own set them
    leave: float = 0.0  # seconds of the budget kept back for the steps after it


@dataclass
class Outcome:
    name: str
    command: str
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    skipped: str = ""
    tail: list[str] = field(default_factory=list)


def plans(results: str) -> dict[str, list[Step]]:
    """Named step lists; ``results`` is the folder (under bench/results) for this machine's JSON."""
    out = f"bench/results/{results}"
    # INTERLACE_CUDA=ON: a build that finds no nvcc fails here, instead of a CPU-only extension failing
    # every test later. No network: pip gives up at once instead of retrying for minutes.
    offline = {"PIP_RETRIES": "0", "PIP_TIMEOUT": "5", "PIP_NO_INPUT": "1"}
    setup = [Step("setup", ["env", "INTERLACE_CUDA=ON", sys.executable, "tools/bootstrap.py", "--venv", ".venv"], 300,
                  required=True, defaults=offline),  # what `make` runs (the box may have no make)
             # Without a usable GPU every GPU test skips and every benchmark writes "skipped": stop instead.
             Step("env", [PY, "-m", "interlace", "env", "--require-gpu", "--out", f"{out}/env.json"], 60, required=True)]  # fmt: skip

    def pytest(name: str, limit: float, *args: str) -> Step:  # its outcomes kept with the results
        return Step(name, [*PYTEST, f"--junitxml={out}/tests/{name}.xml", *args], limit, defaults={"INTERLACE_EAGER_FAILURES": "1"})

    tests = [
        pytest("test-symmetric", 150, "--timeout=60", "tests/test_symmetric.py"),  # cheapest first
        # what fused runs on; cold, it compiles dozens of kernel variants at seconds each
        pytest("test-kernels", 360, "--timeout=120", "tests/test_gemm.py", "tests/test_reduce.py"),
        # pytest's timeouts above the tests' group deadlines (tests/test_fused.py DEADLINE, 60 s on a
        # GPU; 90 s for graph replays): those fail one test naming the wait, pytest's kill the run.
        pytest("test-fused-2", 180, "--timeout=120", "tests/test_fused.py", "-k", "cuda-ipc-2 or local-cuda-2"),
        pytest("test-fused", 300, "--timeout=120", "tests/test_fused.py", "-k", "not (cuda-ipc-2 or local-cuda-2)"),
        # the other files' GPU tests; then the transports' conformance on the GPU (process starts
        # for each transport and world size: last, where a cut costs least); then the unmarked tests
        pytest("test-rest", 300, "--timeout=120", "-m", "gpu", "tests", *(f"--ignore=tests/{f}" for f in (*FIRST, CONFORMANCE))),
        pytest("test-conformance", 300, "--timeout=120", "-m", "gpu", f"tests/{CONFORMANCE}"),
        pytest("test-unmarked", 420, "--timeout=120", "-m", "not gpu", "tests", *(f"--ignore=tests/{f}" for f in FIRST)),
    ]
    # The rank slice first: the numbers. Quick tuning by default: full tuning compiles 8
    # GEMM configs per shape, for about a dozen shapes; its envelope records which (export
    # INTERLACE_TUNE=full to override). Each benchmark keeps its rows if cut off.
    measure = [
        # --resume: a run cut off (packed, committed, sent again) goes on where it stopped; delete the
        # file to start afresh (after a change to what it measures)
        Step("bench-rank-slice", [PY, "-m", "bench", "rank_slice", "--resume", "--out", f"{out}/rank_slice.json"], 330,
             defaults={"INTERLACE_TUNE": "quick"}, leave=40),  # time for the report
        Step("report", [PY, "-m", "bench", "report", f"{out}/rank_slice.json", "--out-dir", f"{out}/report"], 60),
        Step("bench-decode", [PY, "-m", "bench", "decode", "--out", f"{out}/decode.json"], 120),  # seconds: small shapes
        Step("bench-gemm", [PY, "-m", "bench", "gemm", "--out", f"{out}/gemm.json"], 240),
        Step("bench-layers", [PY, "-m", "bench", "layers", *LAYERS, "--out", f"{out}/layers.json"], 240),
    ]
    return {"check": setup + tests, "measure": setup + measure, "all": setup + tests + measure}


def select(steps: list[Step], names: str | None) -> list[Step]:
    """The required steps (in plan order), then those named, in the order named (all, in plan
    order, when ``names`` is None): what matters most goes first, before the budget runs out."""
    if names is None:
        return steps
    wanted = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    by_name = {s.name: s for s in steps}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; this plan has {list(by_name)}")
    return [s for s in steps if s.required] + [by_name[n] for n in wanted if not by_name[n].required]


def carried_headers(root: Path = REPO, include: Path = Path(sysconfig.get_paths()["include"])) -> str | None:
    """``root/.pyheaders/pythonX.Y`` when this interpreter's ``include`` folder has no Python.h and
    that one does: what INTERLACE_PYTHON_INCLUDE (setup.py) should name; else None."""
    carried = root / ".pyheaders" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if (include / "Python.h").is_file() or not (carried / "Python.h").is_file():
        return None
    return str(carried)


def find_nvcc(cuda_homes: tuple[str, ...] = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")) -> str | None:
    """nvcc on PATH, else in a usual CUDA home (CMake only looks on PATH and in CUDACXX)."""
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [home for pattern in cuda_homes for home in sorted(glob.glob(pattern), key=_version_key, reverse=True)]  # newest first
    return next((str(nvcc) for home in homes if (nvcc := Path(home) / "bin" / "nvcc").is_file()), None)


def _version_key(path: str) -> tuple[int, ...]:
    """(12, 10) from ``/usr/local/cuda-12.10``: versions compare as numbers, not text."""
    return tuple(int(n) for n in re.findall(r"\d+", Path(path).name))


def machine_name() -> str:
    """``h100-80gb-hbm3`` from the first GPU's name (nvidia-smi; ``cpu`` without one): the results folder."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
        name = done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        name = "cpu"
    return slug(name)


def slug(gpu_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower().replace("nvidia", "")).strip("-") or "unknown-gpu"


def run_step(step: Step, limit: float, log_path: Path) -> Outcome:
    """Run ``step`` in its own process group, its output going straight to ``log_path`` (kept if
    this script is killed); kill the group at ``limit`` seconds."""
    outcome = Outcome(step.name, " ".join(step.argv))
    junit = next((REPO / a.removeprefix("--junitxml=") for a in step.argv if a.startswith("--junitxml=")), None)
    if junit is not None:
        junit.unlink(missing_ok=True)  # one an earlier call brought back must not pass for this one's
    with open(log_path, "a") as log:
        log.write(f"\n===== {step.name}: {outcome.command} (limit {limit:.0f} s)\n")
        log.flush()
        begin = log.tell()
        start = time.monotonic()
        try:
            # its own process group, in this session: killed with this script's session if that is killed
            proc = subprocess.Popen(step.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, process_group=0,
                                    env={**step.defaults, **os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        except OSError as error:  # no such program: the step fails as a shell's would, and the session goes on
            log.write(f"cannot start {step.argv[0]}: {error}\n")
            outcome.rc, outcome.tail = 127, [f"cannot start {step.argv[0]}: {error}"]
            return outcome
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            outcome.timed_out = True
            _kill_group(proc)
        except BaseException:  # this script is being stopped (Stopped, KeyboardInterrupt): the step goes too,
            _kill_group(proc, (1.0, 5.0))  # soon, so that what was done is packed before a SIGKILL may follow
            raise
        outcome.rc, outcome.seconds = proc.returncode, round(time.monotonic() - start, 1)
        _kill_group(proc, (0.0,))  # what it left running (a rank process, say) goes with it; no second wait
        if outcome.timed_out:
            log.write(f"\n===== {step.name}: killed after {limit:.0f} s\n")
    with open(log_path, encoding="utf-8", errors="replace") as log:  # a compiler's or driver's stray byte must not end the session
        log.seek(begin)
        lines = log.read().splitlines()
    outcome.tail = lines[-8:]
    started = [line for line in lines if STARTED_TEST.match(line)]  # pytest -v names each test as it starts
    if (outcome.rc != 0 or outcome.timed_out) and started and started[-1] not in outcome.tail:
        outcome.tail.append(f"last test started: {started[-1]}")
    if junit is not None and not junit.exists():
        outcome.tail.append("no JUnit XML: pytest did not finish (a test's --timeout or the step's limit killed it, or it "
                            "could not start); see session.log")  # fmt: skip
    return outcome


KILL_GRACE = (5, 30)  # seconds after SIGTERM, then after SIGKILL
STARTED_TEST = re.compile(r"^tests/\S+::")


class Stopped(Exception):
    """SIGTERM reached this script: the running step is killed, and what is done is written."""


def _stop(signum, frame) -> None:
    raise Stopped(f"stopped by signal {signum}")


def _kill_group(proc: subprocess.Popen, graces: tuple[float, ...] = KILL_GRACE) -> None:
    """SIGTERM then SIGKILL to ``proc``'s process group, each followed by its grace (seconds);
    with one grace, SIGKILL alone."""
    for sig, grace in zip((signal.SIGTERM, signal.SIGKILL)[-len(graces):], graces):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_plan(steps: list[Step], out: Path, budget: float, reserve: float = sum(KILL_GRACE) + 10, least: float = LEAST,
             after_step: Callable[[], None] = lambda: None) -> list[Outcome]:  # fmt: skip
    """Each step under ``min(its limit, budget left - reserve)`` (``reserve`` covers killing a step
    and packing); skipped when less than ``least`` seconds are left, or when a required step
    before it failed. ``summary.json`` is rewritten, and ``after_step()`` called, after every step
    run. Progress goes to stderr."""
    out.mkdir(parents=True, exist_ok=True)
    end, outcomes, stop = time.monotonic() + budget, [], ""
    (out / "session.log").write_text("")
    for step in steps:
        left = end - time.monotonic() - reserve
        if stop or left < least:
            outcomes.append(Outcome(step.name, " ".join(step.argv), skipped=stop or f"{max(left, 0):.0f} s of budget left"))
        else:
            try:
                outcomes.append(run_step(step, min(step.limit, max(least, left - step.leave)), out / "session.log"))
            except (Stopped, KeyboardInterrupt) as error:
                outcomes.append(Outcome(step.name, " ".join(step.argv), timed_out=True, skipped=f"killed: {error or 'interrupted'}"))
                stop = f"the session was {error or 'interrupted'}"
                _write_summary(out, outcomes)
                continue
            except Exception as error:  # this script's own failure around the step: said, and the next step still runs
                outcomes.append(Outcome(step.name, " ".join(step.argv), rc=1, tail=[f"the session failed around this step: {error!r}"]))
            print(f"{step.name:>18}: {_verdict(outcomes[-1])} in {outcomes[-1].seconds:.0f} s", file=sys.stderr, flush=True)
            if step.required and outcomes[-1].rc != 0:
                stop = f"{step.name} failed"
            after_step()
        _write_summary(out, outcomes)
    return outcomes


def _write_summary(out: Path, outcomes: list[Outcome]) -> None:
    (out / "summary.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")


def _verdict(outcome: Outcome) -> str:
    if outcome.skipped:
        return f"skipped ({outcome.skipped})"
    if outcome.timed_out:
        return "CUT OFF"
    return "ok" if outcome.rc == 0 else f"FAILED (exit {outcome.rc})"


def pack(results: Path, archive: Path, root: Path = REPO) -> None:
    """``results`` (a folder under ``root``) as a gzipped tar with paths relative to ``root``."""
    partial = archive.with_name(archive.name + ".partial")  # the last complete archive stays until this one is
    with tarfile.open(partial, "w:gz") as tar:
        if results.exists():
            tar.add(results, arcname=str(results.relative_to(root)), filter=lambda m: None if m.name.endswith(".partial") else m)
    os.replace(partial, archive)


CACHE_LIMIT = 48 << 20  # bytes of compiled kernels worth bringing back: a call's carry takes 64 MiB in all
FETCH_LIMIT = 15 << 20  # bytes of one file back from $OUT: one over 16 MiB does not come back
# What a Triton cache hit reads (3.6: the metadata and group index, the binary; the launchers): the
# IRs and PTX, most of an entry's bytes, are left behind. A hit skips the files an index names but lacks.
HIT_SUFFIXES = (".json", ".cubin", ".so")


def pack_cache(cache: Path, archive: Path, since: float = 0.0, limit: int = CACHE_LIMIT, fetch_limit: int = FETCH_LIMIT) -> str:
    """The kernels compiled into ``cache`` since ``since`` (a time.time()), as a gzipped tar to
    unpack into ``.triton-cache`` here, beside those carried before: the files a cache hit reads,
    whole cache entries (folders), newest first while they fit in ``limit`` bytes, and fewer while
    the archive exceeds ``fetch_limit`` (a larger file would not come back at all). What was done,
    in words."""
    entries: dict[Path, list[Path]] = {}
    for f in cache.rglob("*") if cache.is_dir() else []:
        if f.is_file() and f.suffix in HIT_SUFFIXES and f.stat().st_mtime >= since:
            entries.setdefault(f.parent, []).append(f)
    newest = sorted(entries.values(), key=lambda fs: max(f.stat().st_mtime for f in fs), reverse=True)
    partial, asked = archive.with_name(archive.name + ".partial"), limit
    while True:
        packed, size = [], 0
        for files in newest:
            if size + (more := sum(f.stat().st_size for f in files)) <= limit:
                packed, size = packed + files, size + more
        if not packed:
            partial.unlink(missing_ok=True)  # one over fetch_limit would not come back
            within = f"{asked >> 20} MiB" + (f" and an archive of {fetch_limit >> 20} MiB" if limit < asked else "")
            return f"compiled kernels not packed: {len(entries)} new cache entries, none within {within}"
        with tarfile.open(partial, "w:gz", compresslevel=6) as tar:  # 9, tarfile's default, takes 4x as long for 2% less
            for f in packed:
                tar.add(f, arcname=str(f.relative_to(cache)))
        if (packed_bytes := partial.stat().st_size) <= fetch_limit:
            break
        limit = int(size * fetch_limit / packed_bytes * 0.9)
    os.replace(partial, archive)
    count = len({f.parent for f in packed})
    return f"compiled kernels packed: {count} of {len(entries)} new cache entries, {size >> 20} MiB, in {archive.name}"


# Triton's cache index names its files by absolute path: the same path on every machine, so
# kernels carried from an earlier call (in .triton-cache) are found, not compiled again.
TRITON_CACHE = Path("/tmp/interlace-triton-cache")


def seed_cache(carried: Path, cache: Path = TRITON_CACHE) -> None:
    """``cache`` holding the kernels ``carried`` in (their times kept: they are not packed again)."""
    if carried.is_dir():
        shutil.copytree(carried, cache, dirs_exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=["check", "measure", "all"], default="check")
    parser.add_argument("--steps", default=None,
                        help="comma list of step names to run from the plan, in this order (set-up and env always run first)")
    parser.add_argument("--out", type=Path, required=True, help="folder for session.log, summary.json, results.tar.gz")
    parser.add_argument("--budget", type=float, default=560.0, help="seconds for every step together")
    args = parser.parse_args(argv)
    if not (REPO / ".git").exists() and not os.environ.get("INTERLACE_COMMIT"):
        parser.error("this copy has no .git: set INTERLACE_COMMIT to the commit it was sent from (result envelopes record it)")
    started, wall_start = time.monotonic(), time.time()
    signal.signal(signal.SIGTERM, _stop)  # then the running step is killed, and the summary and results are written
    # Not setdefault: an image's own value (1, as some set) puts every stream on one hardware queue,
    # where a stream wait holds back the peer work it waits for. Compiled kernels kept between calls.
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "32"
    os.environ["TRITON_CACHE_DIR"] = str(TRITON_CACHE)  # not an image's own: the carried kernels are seeded here
    seed_cache(REPO / ".triton-cache")
    if "INTERLACE_PYTHON_INCLUDE" not in os.environ and (headers := carried_headers()):
        os.environ["INTERLACE_PYTHON_INCLUDE"] = headers
        # and for the C launcher Triton compiles with gcc at its first launch
        os.environ["CPATH"] = os.pathsep.join(filter(None, [headers, os.environ.get("CPATH")]))
        print(f"this Python has no headers: building with those carried in {headers}", file=sys.stderr, flush=True)
    if (nvcc := find_nvcc()) is not None:
        os.environ.setdefault("CUDACXX", nvcc)  # CMake looks on PATH, not in /usr/local/cuda/bin
    machine = machine_name()
    steps = select(plans(machine)[args.plan], args.steps)
    results = REPO / "bench" / "results" / machine

    def keep() -> None:  # after every step: a session killed from outside still brings back what was done
        pack(results, args.out / "results.tar.gz")

    try:
        outcomes = run_plan(steps, args.out, args.budget - (time.monotonic() - started), after_step=keep)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the packing short
        keep()
        print(pack_cache(TRITON_CACHE, args.out / "triton-cache.tar.gz", since=wall_start), file=sys.stderr, flush=True)
    print("\n".join(f"{o.name:>18}: {_verdict(o)}" + "".join(f"\n{'':>20}{line}" for line in o.tail[-3:]) for o in outcomes))
    return 0 if all(o.rc == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
