"""`make` set-up: never replaces torch, and works offline where the dependencies are already there."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bootstrap  # noqa: E402


def test_fresh_machine_installs_pinned_torch_first_then_triton_then_the_rest():
    steps = bootstrap.plan_installs({}, linux=True)
    assert steps[0] == ["torch==2.13.0"] and steps[1] == ["triton==3.7.1"]
    assert not any("torch" == r.split(">")[0] for r in steps[2])
    assert {r.split(">")[0] for r in steps[2]} == set(bootstrap.REQUIREMENTS)


def test_existing_torch_and_triton_are_kept():
    have = {"torch": "2.11.0+cu130", "triton": "3.6.0", "numpy": "2.5", "nvidia-ml-py": "13", "pytest": "9",
            "pytest-timeout": "2.4", "setuptools": "80.9", "transformers": "5.17.0",
            "pybind11": "3.0.1"}  # fmt: skip
    assert bootstrap.plan_installs(have, linux=True) == []
    have.pop("pytest-timeout")
    assert bootstrap.plan_installs(have, linux=True) == [["pytest-timeout>=2.1"]]


def test_too_old_versions_are_upgraded_within_ranges():
    have = {"torch": "2.13.0+cpu", "triton": "3.7.1", "numpy": "2.4.6", "nvidia-ml-py": "13.615.71",
            "pytest": "9.2.0", "pytest-timeout": "2.4.0", "setuptools": "65.5.0", "transformers": "5.23.0",
            "pybind11": "3.0.1"}  # fmt: skip
    assert bootstrap.plan_installs(have, linux=True) == [["setuptools>=70.1"]]


@pytest.mark.parametrize(
    "version,requirement,ok",
    [("70.1", "setuptools>=70.1", True), ("70.0.9", "setuptools>=70.1", False), ("80.9.0", "setuptools>=70.1", True),
     ("2.13.0+cpu", "x>=2.4", True), ("2.4.0rc1", "x>=2.4", True), ("1.26", "numpy>=1.24", True), (None, "x", False)],
)  # fmt: skip
def test_satisfies(version, requirement, ok):
    assert bootstrap.satisfies(version, requirement) is ok


def test_no_triton_off_linux():
    assert ["triton==3.7.1"] not in bootstrap.plan_installs({"torch": "2.13.0"}, linux=False)


@pytest.mark.timeout(600)
def test_offline_setup_from_an_interpreter_that_already_has_torch(tmp_path):
    """The GPU box: its python3 may itself be a venv holding CUDA torch, and there is no network.

    Run the bootstrap from this test's interpreter (a venv with torch) with the package index
    switched off: it must build a venv that imports the same torch and interlace, installing
    nothing. Then again from that venv's interpreter (this test, run by `make test` on the box):
    each link must carry the one before it.
    """
    source = tmp_path / "checkout"
    if not shutil.which("git"):
        pytest.skip("no git here to list the checkout's files")
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True).stdout.split()
    for name in tracked or pytest.skip("not a git checkout"):  # a copy: the editable build must not touch this tree
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "INTERLACE_CUDA": "OFF"}  # the CPU build is quicker
    import torch

    python = Path(sys.executable)
    for venv in (tmp_path / "venv", tmp_path / "venv-from-venv"):
        done = subprocess.run([python, str(source / "tools" / "bootstrap.py"), "--venv", str(venv)],
                              capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "--no-deps --no-build-isolation -e" in done.stdout
        assert "torch==" not in done.stdout, f"{venv.name}: the existing torch must be used, not reinstalled"
        probe = "import torch, interlace, interlace.engine.comm; print(torch.__version__, interlace.__file__)"
        python = venv / "bin" / "python"
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        version, location = out.stdout.split()
        assert version == torch.__version__
        assert Path(location).resolve().is_relative_to(source.resolve())
