"""tools/gpu_session.py: every step under a deadline that the whole session's budget bounds."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_session  # noqa: E402
from gpu_session import Step  # noqa: E402

PY = sys.executable


def test_a_step_past_its_limit_is_killed_with_its_children_and_the_next_still_runs(tmp_path):
    marker = tmp_path / "child-survived"
    child = tmp_path / "child.py"  # outlives its parent unless the whole process group is killed
    child.write_text(f"import time; time.sleep(4); open({str(marker)!r}, 'w')")
    stuck = f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(child)!r}]); time.sleep(60)"
    steps = [Step("stuck", [PY, "-c", stuck], limit=1.5), Step("after", [PY, "-c", "print('after ran')"], limit=30)]
    start = time.monotonic()
    stuck_out, after = gpu_session.run_plan(steps, tmp_path, budget=120, reserve=0)
    assert time.monotonic() - start < 30
    assert stuck_out.timed_out and stuck_out.rc != 0 and 1.5 <= stuck_out.seconds < 15
    assert after.rc == 0 and not after.timed_out and after.tail == ["after ran"]
    time.sleep(4.5)
    assert not marker.exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["name"], s["timed_out"], s["rc"]) for s in summary] == [("stuck", True, stuck_out.rc), ("after", False, 0)]
    log = (tmp_path / "session.log").read_text()
    assert "===== stuck: killed after 2 s" in log and "after ran" in log


def test_a_failed_required_step_skips_the_rest_and_says_why(tmp_path):
    steps = [Step("setup", [PY, "-c", "raise SystemExit(3)"], 30, required=True), Step("tests", [PY, "-c", "pass"], 30)]
    setup, tests = gpu_session.run_plan(steps, tmp_path, budget=120, reserve=0)
    assert setup.rc == 3 and tests.rc is None and tests.skipped == "setup failed"


def test_the_budget_cuts_limits_and_skips_what_no_longer_fits(tmp_path):
    steps = [Step("long", [PY, "-c", "import time; time.sleep(60)"], limit=600), Step("late", [PY, "-c", "pass"], 30)]
    long, late = gpu_session.run_plan(steps, tmp_path, budget=5, reserve=0, least=2)
    assert long.timed_out and long.seconds < 15  # cut to the budget, not its own 600 s
    assert late.rc is None and late.skipped.endswith("s of budget left")


def test_a_step_leaves_the_time_it_is_told_to_for_the_steps_after_it(tmp_path):
    steps = [Step("bench", [PY, "-c", "import time; time.sleep(60)"], limit=600, leave=4), Step("report", [PY, "-c", "pass"], 30)]
    bench, report = gpu_session.run_plan(steps, tmp_path, budget=8, reserve=0, least=1)
    assert bench.timed_out and bench.seconds < 6 and report.rc == 0


def test_pack_keeps_paths_relative_to_the_root(tmp_path):
    results = tmp_path / "bench" / "results" / "h100"
    (results / "report").mkdir(parents=True)
    (results / "gemm.json").write_text("{}")
    (results / "report" / "README.md").write_text("# report")
    gpu_session.pack(results, tmp_path / "r.tar.gz", root=tmp_path)
    with tarfile.open(tmp_path / "r.tar.gz") as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert names == {"bench/results/h100/gemm.json", "bench/results/h100/report/README.md"}


@pytest.mark.parametrize("name", ["test-fused-2", "test-fused", "test-rest", "test-conformance", "test-unmarked"])
def test_the_planned_test_selections_select_tests(name, tmp_path):
    """A renamed test id or file must not turn a GPU step into a silent no-op."""
    step = next(s for s in gpu_session.plans("x")["all"] if s.name == name)
    argv = [PY if a == gpu_session.PY else f"--junitxml={tmp_path / 'junit.xml'}" if a.startswith("--junitxml=") else a for a in step.argv]
    done = subprocess.run([*argv, "--collect-only"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert " collected" in done.stdout or "tests collected" in done.stdout, done.stdout[-500:]


def test_every_planned_file_and_benchmark_exists():
    from bench.__main__ import BENCHMARKS

    for step in gpu_session.plans("x")["all"]:
        for arg in step.argv:
            if arg.startswith(("tests/", "--ignore=tests/")):
                assert (REPO / arg.removeprefix("--ignore=")).exists(), (step.name, arg)
        if step.argv[1:3] == ["-m", "bench"]:
            assert step.argv[3] in {*BENCHMARKS, "report"}, step.name


def test_steps_can_be_picked_by_name_and_set_up_and_env_always_run():
    plan = gpu_session.plans("x")["all"]
    # in the order named: what matters most first, before the budget runs out
    assert [s.name for s in gpu_session.select(plan, "bench-gemm, test-rest, env")] == ["setup", "env", "bench-gemm", "test-rest"]
    assert gpu_session.select(plan, None) == plan
    with pytest.raises(SystemExit, match=r"unknown steps \['bench-gem'\]; this plan has \['setup', 'env'"):
        gpu_session.select(plan, "bench-gem")


def test_the_results_folder_is_named_after_the_gpu():
    assert gpu_session.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_session.slug("NVIDIA H200") == "h200" and gpu_session.slug("cpu") == "cpu"
    if shutil.which("nvidia-smi") is None:
        assert gpu_session.machine_name() == "cpu"


def test_a_stopped_session_kills_its_step_and_still_writes_its_summary_and_results(tmp_path):
    """SIGTERM to the script (a device command's time limit): the running step's process group is
    killed, the summary says so, and results.tar.gz is written."""
    marker = tmp_path / "step-survived"
    script = tmp_path / "step.py"
    script.write_text(f"import time; time.sleep(8); open({str(marker)!r}, 'w')")
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import sys, signal\n"
        f"sys.path.insert(0, {str(REPO / 'tools')!r})\n"
        "import gpu_session as g\n"
        "from pathlib import Path\n"
        "signal.signal(signal.SIGTERM, g._stop)\n"
        f"steps = [g.Step('slow', [sys.executable, {str(script)!r}], 60), g.Step('after', [sys.executable, '-c', 'pass'], 60)]\n"
        "try:\n"
        f"    g.run_plan(steps, Path({str(tmp_path / 'out')!r}), 300, reserve=0)\n"
        "finally:\n"
        f"    g.pack(Path({str(tmp_path / 'out')!r}), Path({str(tmp_path / 'r.tar.gz')!r}), root=Path({str(tmp_path)!r}))\n"
    )
    proc = subprocess.Popen([PY, str(runner)])
    time.sleep(2.5)
    proc.terminate()
    assert proc.wait(30) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(s["name"], s["skipped"]) for s in summary] == [("slow", "killed: stopped by signal 15"),
                                                           ("after", "the session was stopped by signal 15")]  # fmt: skip
    assert (tmp_path / "r.tar.gz").exists()
    time.sleep(7)
    assert not marker.exists()


def test_step_defaults_apply_unless_the_session_sets_them(tmp_path, monkeypatch):
    show = [PY, "-c", "import os; print(os.environ['INTERLACE_TUNE'])"]
    steps = [Step("tune", show, 30, defaults={"INTERLACE_TUNE": "quick"})]
    monkeypatch.delenv("INTERLACE_TUNE", raising=False)
    assert gpu_session.run_plan(steps, tmp_path / "a", budget=60, reserve=0)[0].tail == ["quick"]
    monkeypatch.setenv("INTERLACE_TUNE", "full")
    assert gpu_session.run_plan(steps, tmp_path / "b", budget=60, reserve=0)[0].tail == ["full"]


def test_carried_python_headers_are_used_only_where_this_python_has_none(tmp_path):
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    own, carried = tmp_path / "include", tmp_path / "repo" / ".pyheaders" / version
    own.mkdir()
    assert gpu_session.carried_headers(tmp_path / "repo", own) is None  # none carried
    carried.mkdir(parents=True)
    (carried / "Python.h").write_text("")
    assert gpu_session.carried_headers(tmp_path / "repo", own) == str(carried)
    (own / "Python.h").write_text("")
    assert gpu_session.carried_headers(tmp_path / "repo", own) is None  # this Python's own come first


def test_a_step_that_cannot_start_fails_like_a_shell_and_the_rest_still_run(tmp_path):
    packed = []
    steps = [Step("missing", [str(tmp_path / "no-such-program")], 30), Step("after", [PY, "-c", "print('after ran')"], 30)]
    missing, after = gpu_session.run_plan(steps, tmp_path, budget=60, reserve=0, after_step=lambda: packed.append(1))
    assert missing.rc == 127 and missing.tail[0].startswith(f"cannot start {tmp_path / 'no-such-program'}")
    assert after.rc == 0 and after.tail == ["after ran"]
    assert packed == [1, 1]  # the results are packed again after every step run


def test_pack_leaves_out_files_being_written_and_replaces_the_archive_whole(tmp_path):
    results = tmp_path / "bench" / "results" / "h100"
    results.mkdir(parents=True)
    (results / "gemm.json").write_text("{}")
    (results / "rank_slice.json.partial").write_text("{")
    archive = tmp_path / "r.tar.gz"
    gpu_session.pack(results, archive, root=tmp_path)
    with tarfile.open(archive) as tar:
        assert {m.name for m in tar.getmembers() if m.isfile()} == {"bench/results/h100/gemm.json"}
    assert not archive.with_name("r.tar.gz.partial").exists()


def test_a_copy_without_git_needs_the_commit_it_was_sent_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_session, "REPO", tmp_path)
    monkeypatch.delenv("INTERLACE_COMMIT", raising=False)
    with pytest.raises(SystemExit) as stop:
        gpu_session.main(["--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "this copy has no .git: set INTERLACE_COMMIT" in capsys.readouterr().err


def test_nvcc_is_found_off_path_in_a_cuda_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_session.find_nvcc((str(tmp_path / "cuda"),)) is None
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert gpu_session.find_nvcc((str(tmp_path / "none"), str(tmp_path / "cuda"))) == str(nvcc)
    monkeypatch.setenv("PATH", str(nvcc.parent) + os.pathsep + os.environ["PATH"])
    assert gpu_session.find_nvcc(()) == str(nvcc)  # PATH first
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for version in ("12.9", "12.10"):
        (tmp_path / f"cuda-{version}" / "bin").mkdir(parents=True)
        (tmp_path / f"cuda-{version}" / "bin" / "nvcc").write_text("")
    assert gpu_session.find_nvcc((str(tmp_path / "cuda-*"),)) == str(tmp_path / "cuda-12.10" / "bin" / "nvcc")  # the newest


def test_without_a_usable_gpu_the_session_stops_after_set_up():
    env = next(s for s in gpu_session.plans("x")["all"] if s.name == "env")
    assert env.required and "--require-gpu" in env.argv and env.argv[-1] == "bench/results/x/env.json"
    tests = [s for s in gpu_session.plans("x")["check"] if s.name.startswith("test-")]
    assert all(f"--junitxml=bench/results/x/tests/{s.name}.xml" in s.argv for s in tests)


def test_compiled_kernels_come_back_newest_first_within_the_limit_and_only_what_a_hit_reads(tmp_path):
    cache, archive = tmp_path / "cache", tmp_path / "c.tar.gz"
    assert gpu_session.pack_cache(cache, archive) == "compiled kernels not packed: 0 new cache entries, none within 48 MiB"
    for age, entry in enumerate(["new", "old", "older"]):
        (cache / entry).mkdir(parents=True)
        for name, size in [("gemm_kernel.cubin", 600), ("gemm_kernel.json", 100), ("__grp__gemm_kernel.json", 100), ("gemm_kernel.ptx", 5000)]:
            (cache / entry / name).write_bytes(b"\0" * size)
            os.utime(cache / entry / name, (1e9 - age, 1e9 - age))
    assert gpu_session.pack_cache(cache, archive, limit=700).startswith("compiled kernels not packed: 3 new cache entries")
    assert not archive.exists()
    assert gpu_session.pack_cache(cache, archive, limit=1700) == "compiled kernels packed: 2 of 3 new cache entries, 0 MiB, in c.tar.gz"
    with tarfile.open(archive) as tar:  # unpacked into .triton-cache as it was
        assert sorted(m.name for m in tar.getmembers()) == sorted(f"{e}/{n}" for e in ("new", "old") for n in
                                                                  ("gemm_kernel.cubin", "gemm_kernel.json", "__grp__gemm_kernel.json"))  # fmt: skip


def test_carried_kernels_are_seeded_and_only_new_ones_come_back(tmp_path):
    carried, cache = tmp_path / ".triton-cache", tmp_path / "fixed" / "cache"
    (carried / "ab12").mkdir(parents=True)
    (carried / "ab12" / "old.cubin").write_bytes(b"old")
    os.utime(carried / "ab12" / "old.cubin", (1e9, 1e9))
    gpu_session.seed_cache(carried, cache)
    assert (cache / "ab12" / "old.cubin").read_bytes() == b"old"
    since = time.time()
    (cache / "cd34").mkdir()
    (cache / "cd34" / "new.cubin").write_bytes(b"new")
    assert gpu_session.pack_cache(cache, tmp_path / "c.tar.gz", since=since).startswith("compiled kernels packed: 1 of 1 new cache entries")
    with tarfile.open(tmp_path / "c.tar.gz") as tar:
        assert [m.name for m in tar.getmembers()] == ["cd34/new.cubin"]


def test_what_a_step_leaves_running_is_killed_when_it_ends(tmp_path):
    marker = tmp_path / "child-survived"
    child = tmp_path / "child.py"
    child.write_text(f"import time; time.sleep(3); open({str(marker)!r}, 'w')")
    leaves = f"import subprocess, sys; subprocess.Popen([sys.executable, {str(child)!r}])"
    (done,) = gpu_session.run_plan([Step("leaves", [PY, "-c", leaves], limit=30)], tmp_path, budget=60, reserve=0)
    assert done.rc == 0 and not done.timed_out
    time.sleep(3.5)
    assert not marker.exists()


def test_a_pytest_step_without_its_junit_file_says_pytest_was_killed(tmp_path):
    junit = tmp_path / "tests" / "x.xml"
    step = Step("test-x", [PY, "-c", "print('ran')", f"--junitxml={junit}"], limit=30)
    (done,) = gpu_session.run_plan([step], tmp_path, budget=60, reserve=0)
    assert done.tail[0] == "ran" and done.tail[1].startswith("no JUnit XML: pytest did not finish")
    junit.parent.mkdir(parents=True)
    junit.write_text("<testsuites/>")  # an earlier call's, brought back and carried in
    (again,) = gpu_session.run_plan([step], tmp_path, budget=60, reserve=0)
    assert again.tail[1].startswith("no JUnit XML") and not junit.exists()


@pytest.mark.parametrize("eager", [True, False])
def test_a_failure_is_reported_before_a_later_crash_ends_pytest(tmp_path, eager):
    """gpu_session's pytest steps set INTERLACE_EAGER_FAILURES: a failure's report must not wait
    for the end of a run that a hung test (killed) never reaches."""
    (tmp_path / "test_x.py").write_text("import os\n\ndef test_fails():\n    assert 1 == 2, 'the cause'\n\ndef test_dies():\n    os._exit(9)\n")
    env = {k: v for k, v in os.environ.items() if k != "INTERLACE_EAGER_FAILURES"} | {"PYTHONPATH": str(REPO / "tests")}
    env |= {"INTERLACE_EAGER_FAILURES": "1"} if eager else {}
    done = subprocess.run([PY, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "test_x.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 9, done.stdout[-2000:] + done.stderr[-2000:]
    assert ("===== FAILED test_x.py::test_fails (call)" in done.stdout and "the cause" in done.stdout) == eager


def test_a_step_printing_bytes_that_are_not_utf8_and_the_next_step_run(tmp_path):
    odd = "import sys; sys.stdout.buffer.write(bytes([99, 97, 102, 0xe9, 32, 0xff, 10]))"
    steps = [Step("odd", [PY, "-c", odd], limit=30), Step("after", [PY, "-c", "print('after ran')"], limit=30)]
    odd_out, after = gpu_session.run_plan(steps, tmp_path, budget=60, reserve=0)
    assert odd_out.rc == 0 and odd_out.tail == ["caf\ufffd \ufffd"] and after.tail == ["after ran"]


def test_a_failed_test_step_names_the_last_test_it_started(tmp_path):
    hung = "print('tests/test_a.py::test_one PASSED'); print('tests/test_a.py::test_two ', flush=True); [print('frame', i) for i in range(20)]; raise SystemExit(1)"
    (done,) = gpu_session.run_plan([Step("test-a", [PY, "-c", hung], limit=30)], tmp_path, budget=60, reserve=0)
    assert done.rc == 1 and done.tail[-1] == "last test started: tests/test_a.py::test_two "


def test_compiled_kernels_that_would_not_come_back_are_packed_fewer(tmp_path):
    cache, archive = tmp_path / "cache", tmp_path / "c.tar.gz"
    for age in range(4):  # random bytes: incompressible, 40 kB an entry
        (cache / f"e{age}").mkdir(parents=True)
        (cache / f"e{age}" / "k.cubin").write_bytes(os.urandom(40_000))
        os.utime(cache / f"e{age}" / "k.cubin", (1e9 - age, 1e9 - age))
    said = gpu_session.pack_cache(cache, archive, fetch_limit=100_000)
    assert said.startswith("compiled kernels packed: 2 of 4 new cache entries") and archive.stat().st_size <= 100_000
    with tarfile.open(archive) as tar:  # the newest
        assert sorted(m.name for m in tar.getmembers()) == ["e0/k.cubin", "e1/k.cubin"]
    said = gpu_session.pack_cache(cache, tmp_path / "d.tar.gz", fetch_limit=30_000)  # not even one entry
    assert said == "compiled kernels not packed: 4 new cache entries, none within 48 MiB and an archive of 0 MiB"
    assert not (tmp_path / "d.tar.gz").exists() and not (tmp_path / "d.tar.gz.partial").exists()
