"""`python -m interlace env`: the envelope of every result, with and without a GPU driver."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import interlace
from interlace.engine.planner.topology import probe


def run_env(*args):
    return subprocess.run([sys.executable, "-m", "interlace", "env", *args], capture_output=True, text=True, timeout=120)


def test_env_json_is_valid_and_complete():
    done = run_env("--json")
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["host"]["cpu_count"] == os.cpu_count()
    assert env["host"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["cuda"]["available"] == torch.cuda.is_available()
    assert env["extension"]["loaded"] and isinstance(env["extension"]["cuda"], bool)
    assert len(env["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    here = os.path.dirname(__file__)
    head = shutil.which("git") and subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
    if head and head.returncode == 0:  # a checkout with commits: the envelope names the exact commit
        assert env["interlace"]["commit"] == head.stdout.strip()


def test_a_copy_without_git_records_the_commit_it_is_told(tmp_path):
    """A lent GPU gets the working tree without ``.git``: INTERLACE_COMMIT names what was sent."""
    shutil.copytree(Path(interlace.__file__).parent, tmp_path / "interlace", ignore=shutil.ignore_patterns("__pycache__"))
    commit = os.urandom(20).hex()
    probe_git = "from interlace.engine.telemetry.envelope import REPO_ROOT, _git_state; print(REPO_ROOT, _git_state()['commit'])"
    for told, expected in ((commit, commit), (None, "None")):
        env = {k: v for k, v in os.environ.items() if k != "INTERLACE_COMMIT"} | ({"INTERLACE_COMMIT": told} if told else {})
        done = subprocess.run([sys.executable, "-c", probe_git], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**env, "PYTHONPATH": str(tmp_path)})  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(tmp_path), expected]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU driver")
def test_env_without_driver_says_so_and_succeeds():
    done = run_env()
    assert done.returncode == 0, done.stderr
    assert "no NVIDIA driver found" in done.stdout


def test_require_gpu_fails_saying_why_where_the_gpu_paths_cannot_run(tmp_path):
    done = run_env("--require-gpu", "--out", str(tmp_path / "env" / "env.json"))
    written = json.loads((tmp_path / "env" / "env.json").read_text())
    assert written["cuda"]["available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert done.returncode == 1 and "interlace env --require-gpu: torch sees no CUDA GPU" in done.stderr
    elif not written["extension"]["cuda"]:
        assert done.returncode == 1 and "interlace._C was built without CUDA" in done.stderr
    else:
        assert done.returncode == 0, done.stderr


def test_gpu_missing_names_each_reason():
    from interlace.cli import gpu_missing

    env = {"cuda": {"available": True, "torch_cuda": "13.0"}, "gpu_status": "1 GPU", "extension": {"loaded": True, "cuda": True}}
    assert gpu_missing(env) is None
    assert "built without CUDA" in gpu_missing({**env, "extension": {"loaded": True, "cuda": False}})
    assert gpu_missing({**env, "extension": {"loaded": False, "error": "no _C"}}) == "interlace._C does not load: no _C"
    assert gpu_missing({**env, "cuda": {"available": False, "torch_cuda": None}}).startswith("torch sees no CUDA GPU (torch built with CUDA none")


class StandInNVML:
    """The NVML calls probe() makes, answering for a machine we do not have: two H100s joined
    by 18 NVLinks and a third GPU reachable only across the CPU interconnect."""

    NVML_NVLINK_MAX_LINKS, NVML_FEATURE_ENABLED = 18, 1

    class NVMLError(Exception):
        pass

    class _Info:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    BUS = ["00000000:18:00.0", "00000000:2A:00.0", "00000000:9B:00.0"]

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return 3
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return b"NVIDIA H100 80GB HBM3" if h < 2 else "NVIDIA L4"
    def nvmlDeviceGetMemoryInfo(self, h): return self._Info(total=80 * 2**30 if h < 2 else 24 * 2**30)
    def nvmlDeviceGetPciInfo(self, h): return self._Info(busId=self.BUS[h])
    def nvmlDeviceGetCudaComputeCapability(self, h): return (9, 0) if h < 2 else (8, 9)
    def nvmlSystemGetDriverVersion(self): return "580.65.06"
    def nvmlSystemGetCudaDriverVersion_v2(self): return 13000

    def nvmlDeviceGetNvLinkState(self, h, link):
        if h == 2:
            raise self.NVMLError("NVLink not supported")
        return self.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return self._Info(busId=self.BUS[1 - h].lower().replace("00000000:", "0000:"))

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return 50 if 2 in (a, b) else 30

    def nvmlDeviceGetP2PStatus(self, a, b, index):
        return 0 if 2 not in (a, b) else 2

    def nvmlDeviceGetClockInfo(self, h, clock): return {1: 345, 2: 2619}[clock]  # NVML_CLOCK_SM, NVML_CLOCK_MEM; idle
    def nvmlDeviceGetMaxClockInfo(self, h, clock): return {1: 1980, 2: 2619}[clock]
    def nvmlDeviceGetPowerManagementLimit(self, h): return 700_000  # mW
    def nvmlDeviceGetTemperature(self, h, sensor): return 31 + h

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        if h == 2:  # an older driver: the name the bindings had before
            raise AttributeError("nvmlDeviceGetCurrentClocksEventReasons")
        return 1  # GPU idle

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h): return 4  # the SW power cap


def test_topology_counts_nvlinks_per_peer_and_labels_paths():
    topo = probe(StandInNVML())
    assert topo.status == "3 GPU(s) found"
    assert (topo.driver, topo.cuda_driver) == ("580.65.06", "13.0")
    assert [g.nvlinks_active for g in topo.gpus] == [18, 18, 0]
    assert [g.compute_capability for g in topo.gpus] == ["9.0", "9.0", "8.9"]
    assert topo.gpus[0].name == "NVIDIA H100 80GB HBM3" and topo.gpus[2].memory_bytes == 24 * 2**30
    assert topo.matrix() == [["X", "NV18", "SYS"], ["NV18", "X", "SYS"], ["SYS", "SYS", "X"]]
    link = next(l for l in topo.links if (l.a, l.b) == (0, 2))
    assert not link.p2p_read and not link.p2p_nvlink
    assert topo.gpus[0].state == {"sm_clock_mhz": 345, "sm_clock_max_mhz": 1980, "mem_clock_mhz": 2619, "mem_clock_max_mhz": 2619,
                                  "power_limit_w": 700, "temperature_c": 31, "clock_event_reasons": 1}  # fmt: skip
    assert topo.gpus[2].state["clock_event_reasons"] == 4 and topo.gpus[2].state["temperature_c"] == 33


def test_what_the_driver_does_not_say_about_a_card_is_none():
    class Older(StandInNVML):
        def nvmlDeviceGetPowerManagementLimit(self, h):
            raise self.NVMLError("Not Supported")

        def nvmlDeviceGetClockInfo(self, h, clock):
            raise self.NVMLError("Not Supported")

    state = probe(Older()).gpus[0].state
    assert state["power_limit_w"] is None and state["sm_clock_mhz"] is None and state["mem_clock_mhz"] is None
    assert state["sm_clock_max_mhz"] == 1980 and state["temperature_c"] == 31


def test_topology_without_driver_reports_instead_of_raising():
    class NoDriver(StandInNVML):
        def nvmlInit(self):
            raise self.NVMLError("NVML Shared Library Not Found")

    topo = probe(NoDriver())
    assert topo.status == "no NVIDIA driver found (NVML: NVML Shared Library Not Found)"
    assert topo.gpus == [] and topo.matrix() == []
