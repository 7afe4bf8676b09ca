"""Test configuration shared by every test module.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before any
@triton.jit decorator runs, so it is set here, before any test module imports a kernel. With a
GPU the same kernel tests run on the GPU. GPU-only tests carry the `gpu` marker and skip cleanly;
tests of Triton kernels on CPU tensors carry the `interpreter` marker and skip on a GPU machine.
"""

import os
import random

import pytest

# LocalGroup on one GPU runs a compute stream and a lane per rank: with CUDA's default 8 hardware
# queues they would alias, and a stream wait could block unrelated work. Set before CUDA starts
# (torch.cuda.is_available() initialises the driver).
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import torch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check results, not speed: two GEMM candidates to compile per shape instead of eight.
os.environ.setdefault("INTERLACE_TUNE", "quick")


def pytest_configure(config):
    from interlace.ops.gemm import INTERPRETER_PROBLEM

    if INTERPRETER_PROBLEM:
        pytest.exit(f"the CPU suite runs Triton kernels under the interpreter, and {INTERPRETER_PROBLEM}", returncode=1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    skip_interpreter = pytest.mark.skip(reason="Triton kernels on CPU tensors need the interpreter, which is off where a GPU runs them")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and HAS_GPU:
            item.add_marker(skip_interpreter)


def pytest_runtest_logreport(report):
    """With INTERLACE_EAGER_FAILURES set (tools/gpu_session.py sets it), a failure's report as soon
    as it happens: pytest prints them at the end, which a run killed for a hang never reaches."""
    if report.failed and os.environ.get("INTERLACE_EAGER_FAILURES"):
        seed = dict(report.user_properties).get("seed")
        print(f"\n===== FAILED {report.nodeid} ({report.when}{f', seed {seed}' if seed is not None else ''})\n"
              f"{report.longreprtext}", flush=True)  # fmt: skip


@pytest.fixture
def seed(request):
    """A fresh random seed per test, recorded in the report so a failure can be replayed."""
    value = random.randrange(1 << 30)
    request.node.user_properties.append(("seed", value))
    return value
