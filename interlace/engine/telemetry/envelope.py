"""The envelope every benchmark result carries: what ran, on what, from which commit.

``envelope()`` never fails for missing hardware: on a machine without a GPU driver the GPU
section is empty and ``gpu_status`` says why.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import interlace
from interlace.engine.planner.topology import probe

PACKAGES = ("torch", "triton", "numpy", "nvidia-ml-py")
REPO_ROOT = Path(interlace.__file__).resolve().parents[1]


def envelope() -> dict[str, Any]:
    """Versions, commit, host and GPU topology, as a JSON-ready dict."""
    topology = probe()
    return {
        "interlace": {"version": interlace.__version__, **_git_state(), "tuning": os.environ.get("INTERLACE_TUNE", "full")},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "packages": {name: _version(name) for name in PACKAGES},
        "extension": _extension(),
        "cuda": {
            "torch_cuda": torch.version.cuda,
            "nccl": _nccl_version(),
            "available": torch.cuda.is_available(),
            "driver": topology.driver,
            "driver_cuda": topology.cuda_driver,
        },
        "gpu_status": topology.status,
        "gpus": topology.as_dict()["gpus"],
        "topology": {"matrix": topology.matrix(), "links": topology.as_dict()["links"]},
    }


def format_envelope(env: dict[str, Any]) -> str:
    """The envelope as a short human-readable report."""
    pkgs = ", ".join(f"{k} {v or 'not installed'}" for k, v in env["packages"].items())
    cuda = env["cuda"]
    git = env["interlace"]
    lines = [
        f"interlace {git['version']} (commit {git['commit'] or 'unknown'}{' +local changes' if git['dirty'] else ''})",
        f"python    {env['host']['python']} on {env['host']['platform']}, {env['host']['cpu_count']} CPUs",
        f"packages  {pkgs}",
        f"extension {_describe_extension(env['extension'])}",
        f"cuda      torch built with {cuda['torch_cuda'] or 'no CUDA'}; NCCL {cuda['nccl'] or 'not available'}; "
        f"driver {cuda['driver'] or 'none'}",
        f"gpus      {env['gpu_status']}",
    ]
    for gpu in env["gpus"]:
        gib = gpu["memory_bytes"] / 2**30
        state = gpu.get("state", {})  # envelopes written before it was recorded lack it
        lines.append(f"  [{gpu['index']}] {gpu['name']}, {gib:.0f} GiB, sm_{gpu['compute_capability'].replace('.', '')}, "
                     f"bus {gpu['bus_id']}, {gpu['nvlinks_active']} NVLinks active; power limit {state.get('power_limit_w', '?')} W, "
                     f"SM clock {state.get('sm_clock_mhz', '?')} of {state.get('sm_clock_max_mhz', '?')} MHz, {state.get('temperature_c', '?')} C, "
                     f"clock event reasons {state.get('clock_event_reasons', '?')}")  # fmt: skip
    matrix = env["topology"]["matrix"]
    if len(matrix) > 1:
        lines.append("topology  " + " ".join(f"{'GPU' + str(j):>6}" for j in range(len(matrix))))
        lines += [f"  GPU{i:<6}" + " ".join(f"{c:>6}" for c in row) for i, row in enumerate(matrix)]
    return "\n".join(lines)


def _describe_extension(ext: dict[str, Any]) -> str:
    if not ext["loaded"]:
        return f"not loaded: {ext['error']}"
    cuda = f"CUDA {ext['cuda_runtime']} ({ext['cuda_archs']})" if ext["cuda"] else "CPU only (built without CUDA)"
    return f"interlace._C, {cuda}"


def _extension() -> dict[str, Any]:
    """What interlace._C was built with, or why it cannot be loaded."""
    from interlace.engine.comm.native import build_info

    try:
        return {"loaded": True, **build_info()}
    except ImportError as error:
        return {"loaded": False, "error": str(error)}


def _git_state() -> dict[str, Any]:
    """Commit and dirtiness of the checkout interlace runs from, when it is one; else the commit
    that ``INTERLACE_COMMIT`` names (a copy of a checkout without ``.git``, e.g. on a lent GPU)."""
    if not (REPO_ROOT / ".git").exists():
        return {"commit": os.environ.get("INTERLACE_COMMIT"), "dirty": None}
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_version() -> str | None:
    if not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
        return None
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
