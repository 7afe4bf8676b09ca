"""The native extension, symmetric buffers, flags and copy-engine chunks; CPU processes at world
sizes 2-4 (and a GPU with one). After every test nothing of ours may remain in /dev/shm."""

import gc
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from interlace.engine.comm import SymmetricBuffer, spawn
from interlace.engine.device import new_stream
from interlace.engine.comm import signals
from interlace.engine.comm.symmetric import all_or_none
from interlace.engine.comm.native import build_info, native

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def nothing_left_in_dev_shm():
    before = set(glob.glob("/dev/shm/interlace-*"))
    yield
    assert set(glob.glob("/dev/shm/interlace-*")) - before == set(), "shared memory leaked"


# --- the extension ---------------------------------------------------------------------------------


def test_extension_reports_its_build_and_compiled_cuda_where_nvcc_exists():
    info = build_info()
    assert info["compiler"]
    if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
        assert info["cuda"], "nvcc is here, so `make test` must have compiled the CUDA part (CI catches CUDA errors)"
        assert "sm_90a" in info["cuda_archs"] and "sm_80" in info["cuda_archs"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU driver")
def test_extension_imports_without_a_driver_and_says_why_cuda_is_unusable():
    count, why = native().cuda_device_count()
    assert count < 0 and why  # e.g. cudaErrorInsufficientDriver, or built without CUDA
    with pytest.raises(RuntimeError, match="cudaErrorInsufficientDriver|built without CUDA"):
        native().device_malloc(16, 0, 5.0)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_byte_views_alias_the_memory_on_the_device_they_name(device, seed):
    """What SymmetricBuffer builds its tensors from: a view, never a copy, on the stated device.
    (That a peer GPU's IPC memory is not copied to ours, what the stated device is for, needs two GPUs.)"""
    owner = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).to(device)
    kind, index = (1, 0) if device == "cpu" else (2, owner.device.index)
    view = torch.from_dlpack(native().byte_view(owner.data_ptr() + 16, 1024, kind, index))
    assert view.device == owner.device and view.dtype == torch.uint8 and view.shape == (1024,)
    assert view.data_ptr() == owner.data_ptr() + 16 and torch.equal(view, owner[16:1040])
    view.fill_(7)  # writes land in the owner's memory
    assert owner[16:1040].eq(7).all() and not owner[:16].eq(7).all()
    for _ in range(100):  # a capsule nobody consumed frees its view; a consumed one leaves it to the tensor
        native().byte_view(owner.data_ptr(), 8, kind, index)
        del view
        view = torch.from_dlpack(native().byte_view(owner.data_ptr(), 8, kind, index))
    assert view.tolist() == owner[:8].tolist()


def test_cpu_only_build_offers_the_same_api(tmp_path):
    """INTERLACE_CUDA=OFF builds and imports; its device functions say why they cannot work."""
    import pybind11

    configure = ["cmake", "-S", str(REPO), "-B", str(tmp_path), "-DINTERLACE_CUDA=OFF", f"-DPython_EXECUTABLE={sys.executable}",
                 f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release"]  # fmt: skip
    if headers := os.environ.get("INTERLACE_PYTHON_INCLUDE"):  # as setup.py hints them (a Python without its own)
        configure.append(f"-DPython_INCLUDE_DIR={headers}")
    for cmd in (configure, ["cmake", "--build", str(tmp_path), "--parallel"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    probe = ("import _C; print(_C.build_info()['cuda']); print(sorted(n for n in dir(_C) if not n.startswith('__')));"
             "\ntry:\n _C.device_malloc(8, 0, 5.0)\nexcept RuntimeError as e:\n print(e)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert lines[0] == "False", out.stderr
    assert lines[1] == str(sorted(n for n in dir(native()) if not n.startswith("__")))
    assert lines[2] == "interlace._C was built without CUDA (INTERLACE_CUDA=OFF, or no CUDA toolkit was found)"


# --- buffers shared both ways ----------------------------------------------------------------------


def device_barrier(group):
    """A host barrier after this rank's queued GPU writes have landed, so peers read them."""
    if group.device.type == "cuda":
        torch.cuda.synchronize()
    group.barrier()


def share_both_ways(group):
    w, r = group.world_size, group.rank
    with SymmetricBuffer.allocate(group, 64 * 4, 2 * w) as buf:
        assert torch.equal(buf.flags(r), torch.zeros(2 * w, dtype=torch.int32, device=buf.device))
        buf.peer(r, torch.float32)[:8] = float(r + 1)  # write my own (never 0: the buffer starts zeroed)
        for q in range(w):  # and a slot in every peer's: slot 8 + r
            buf.peer(q, torch.float32)[8 + r] = 100.0 + r
        device_barrier(group)
        for q in range(w):
            signals.write(buf.flags(q), w + r, 1)  # raise my flag in every peer's pad
        signals.host_wait(buf.flags(r), 2 * w - 1, 1, 10.0, rank=r)  # the last rank's flag in my pad
        device_barrier(group)
        mine = buf.peer(r, torch.float32)
        seen = [buf.peer(q, torch.float32)[:8].tolist() for q in range(w)]
        return seen == [[float(q + 1)] * 8 for q in range(w)] and mine[8 : 8 + w].tolist() == [100.0 + q for q in range(w)] \
            and buf.flags(r)[w:].tolist() == [1] * w  # fmt: skip


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_buffers_are_shared_both_ways_between_processes(world_size):
    assert spawn(share_both_ways, world_size, "gloo", timeout=30) == [True] * world_size


def flags_and_timeouts(group):
    with SymmetricBuffer.allocate(group, 16, 3) as buf:
        r, other = group.rank, 1 - group.rank
        if r == 0:
            time.sleep(0.3)
            signals.write(buf.flags(0), 1, 5)  # rank 1 waits on this, on its calling thread
        else:
            start = time.monotonic()
            signals.wait(buf.flags(0), 1, 5, timeout=10)
            waited = time.monotonic() - start
            assert waited >= 0.2, f"returned after {waited:.3f} s, before the flag was raised"
        group.barrier()
        start = time.monotonic()
        with pytest.raises(signals.FlagTimeoutError) as info:
            signals.host_wait(buf.flags(other), 2, 9, 0.5, rank=r)  # never raised
        elapsed = time.monotonic() - start
        assert (info.value.rank, info.value.index, info.value.expected, info.value.observed) == (r, 2, 9, 0)
        assert f"rank {r}: flag 2 did not reach 9 within 0.5 s (observed 0)" in str(info.value)
        assert 0.45 <= elapsed < 3
        return True


def test_flags_cross_processes_and_waits_time_out_naming_everything():
    assert spawn(flags_and_timeouts, 2, "gloo", timeout=30) == [True, True]


def pull_chunks(group):
    """Every rank pulls every peer's data into its own staging area, one flag per chunk."""
    w, r, n = group.world_size, group.rank, 6
    with SymmetricBuffer.allocate(group, 2 * w * n * 4, w) as buf:
        buf.peer(r, torch.float32, (2 * w, n))[0] = torch.arange(n, dtype=torch.float32) + 10 * r
        group.barrier()
        staging = buf.peer(r, torch.float32, (2 * w, n))[w:]
        chunks = [(staging[q], buf.peer(q, torch.float32, (2 * w, n))[0]) for q in range(w)]
        signals.copy_chunks(chunks, buf.flags(r), list(range(w)), value=3)
        for q in range(w):
            signals.host_wait(buf.flags(r), q, 3, 5.0, rank=r)
        ok = torch.equal(staging, torch.arange(n, dtype=torch.float32) + 10 * torch.arange(w, dtype=torch.float32)[:, None])
        group.barrier()
        return ok


@pytest.mark.parametrize("world_size", [2, 3])
def test_copy_chunks_raise_a_flag_per_chunk(world_size):
    assert spawn(pull_chunks, world_size, "gloo", timeout=30) == [True] * world_size


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_an_empty_chunk_copies_nothing_and_still_raises_its_flag(device, seed):
    """Empty pieces (a two-shot chunk with fewer rows than ranks) point one past a buffer's end, or
    nowhere: nothing is copied, the flag is raised, the chunks after it still land."""
    src = torch.randn(8, generator=torch.Generator().manual_seed(seed)).to(device)
    dst, flags = torch.zeros(8, device=device), torch.zeros(3, dtype=torch.int32, device=device)
    empty = torch.empty(0, device=device)
    signals.copy_chunks([(dst[8:], src[8:]), (empty, empty.clone()), (dst[:5], src[:5])], flags, [0, 1, 2], value=7)
    for i in range(3):
        signals.host_wait(flags, i, 7, 10.0)
    assert torch.equal(dst.cpu(), torch.cat([src[:5].cpu(), torch.zeros(3)])) and flags.tolist() == [7] * 3


# --- misuse --------------------------------------------------------------------------------------



@pytest.mark.parametrize("flags, indices", [(True, None), (False, [0, 1]), (True, [0])])
def test_copy_chunks_refuses_flags_that_do_not_match_the_chunks(flags, indices):
    """Flags without indices (or the reverse, or a count that differs) would leave a waiter
    hanging on a flag never raised: refused before anything is copied."""
    src, dst = torch.randn(2, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"2 chunks need flags and as many flag indices, or neither"):
        signals.copy_chunks([(dst[0], src[0]), (dst[1], src[1])], torch.zeros(2, dtype=torch.int32) if flags else None, indices)
    assert not dst.any()

def misuse(group, case):
    if case == "sizes":
        SymmetricBuffer.allocate(group, 64 * (1 + group.rank), 2)
    buf = SymmetricBuffer.allocate(group, 64, 2)
    try:
        if case == "flag_index":
            signals.write(buf.flags(group.rank), 2, 1)
        elif case == "peer_rank":
            buf.peer(group.world_size)
        elif case == "view":
            buf.peer(0, torch.float32, (17,))
    finally:
        buf.close()
    if case == "after_close":
        buf.flags(0)


MISUSE = {
    "sizes": (ValueError, r"ranks disagree on the size: rank 0 asked for 64 bytes and 2 flags; rank 1 asked for 128 bytes and 2 flags"),
    "flag_index": (IndexError, r"flag index 2 out of range for 2 flags"),
    "peer_rank": (IndexError, r"rank \d: peer rank 2 out of range for world size 2"),
    "view": (ValueError, r"a torch.float32 view of 68 bytes at offset 0 does not fit 64 bytes"),
    "after_close": (RuntimeError, r"rank \d: SymmetricBuffer used after close\(\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MISUSE))
def test_misuse_is_named(case):
    error, message = MISUSE[case]
    with pytest.raises(error, match=message):
        spawn(misuse, 2, "gloo", timeout=20, args=(case,))


def test_the_extension_refuses_chunk_lists_of_different_lengths():
    """Called directly (not through signals.copy_chunks), short lists would be read past their end."""
    with pytest.raises(ValueError, match=r"per-chunk lists differ in length \(dst 2, src 1, nbytes 2, flags 2, values 2\)"):
        native().copy_chunks([0, 0], [0], [0, 0], [0, 0], [0, 0])


def agree(group, failing):
    try:
        all_or_none(group, "no room" if group.rank in failing else None, "mapping")
    except RuntimeError as error:
        return str(error)


@pytest.mark.parametrize("failing", [(), (1,), (0, 2)])
def test_a_failure_on_any_rank_is_a_failure_on_every_rank(failing):
    """A rank that could not map its peers' buffers frees its own: none may go on with them."""
    named = f"rank(s) {list(failing)}"
    expected = [f"rank {r}: mapping failed on {named}" + (": no room" if r in failing else "") for r in range(3)]
    assert spawn(agree, 3, "gloo", timeout=20, args=(failing,)) == (expected if failing else [None] * 3)


def killed_mid_run(group):
    with SymmetricBuffer.allocate(group, 1 << 20, 1):
        group.barrier()
        if group.rank == 1:
            os.kill(os.getpid(), 9)
        group.barrier()


def test_a_rank_killed_mid_run_leaves_nothing_in_dev_shm():
    with pytest.raises(Exception, match=r"rank 1 died \(killed by signal 9\)"):
        spawn(killed_mid_run, 3, "gloo", timeout=5, deadline=60)


# --- on a GPU ------------------------------------------------------------------------------------


def gpu_ipc(group):
    """Processes sharing one GPU read and write each other's buffers through CUDA IPC."""
    return share_both_ways(group)


@pytest.mark.gpu
def test_cuda_ipc_between_processes_on_one_gpu():
    assert spawn(gpu_ipc, 2, "nccl", timeout=60) == [True, True]


@pytest.mark.gpu
def test_stream_wait_orders_a_second_stream_after_a_write_on_the_first():
    flags = torch.zeros(1, dtype=torch.int32, device="cuda")
    src, out = torch.zeros(1 << 20, device="cuda"), torch.zeros(1 << 20, device="cuda")
    producer, consumer = new_stream(torch.device("cuda")), new_stream(torch.device("cuda"))
    with torch.cuda.stream(consumer):
        signals.wait(flags, 0, 1)  # queued first: must hold the copy below
        out.copy_(src)
    with torch.cuda.stream(producer):
        torch.cuda._sleep(50_000_000)  # ~tens of ms: without the wait the copy would run first
        src.fill_(7.0)
        signals.write(flags, 0, 1)
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(out, 7.0))


@pytest.mark.gpu
def test_own_streams_are_distinct_and_one_blocked_by_a_stream_wait_holds_back_no_other():
    """torch's pool hands out at most 32 streams per priority (round-robin); no two live
    ``new_stream``s share a handle, however many (collected ones are handed out again). 24 streams
    (more than LocalGroup at world 8 uses: a stream per rank, a lane per rank, its engine) each get
    a hardware queue (CUDA_DEVICE_MAX_CONNECTIONS=32, set by conftest)."""
    device = torch.device("cuda")
    assert len({torch.cuda.Stream().cuda_stream for _ in range(40)}) <= 32
    many = [new_stream(device) for _ in range(40)]
    assert len({s.cuda_stream for s in many}) == 40
    del many[:20]
    gc.collect()
    again = [new_stream(device) for _ in range(20)]
    handles = [s.cuda_stream for s in many + again]
    assert len(set(handles)) == 40, "a handed-out-again stream must not be one still alive"
    del many, again
    gc.collect()
    streams = [new_stream(device) for _ in range(24)]
    flags = torch.zeros(1, dtype=torch.int32, device=device)
    signals.wait(flags, 0, 1, streams[0])  # never raised until every other stream has finished
    done = []
    for s in streams[1:]:
        with torch.cuda.stream(s):
            torch.cuda._sleep(1_000_000)
            done.append(s.record_event())
    deadline = time.monotonic() + 10
    while not all(e.query() for e in done) and time.monotonic() < deadline:
        time.sleep(1e-3)
    stuck = [i + 1 for i, e in enumerate(done) if not e.query()]
    signals.write(flags, 0, 1, streams[1])
    torch.cuda.synchronize()
    assert not stuck, f"streams {stuck} waited behind stream 0's stream wait"


@pytest.mark.gpu
def test_copy_engine_chunks_raise_their_flags_in_order():
    srcs = [torch.full((1 << 18,), float(i), device="cuda") for i in range(4)]
    dst = torch.empty(4, 1 << 18, device="cuda")
    flags = torch.zeros(4, dtype=torch.int32, device="cuda")
    stream = new_stream(torch.device("cuda"))
    stream.wait_stream(torch.cuda.current_stream())  # the sources' fills first
    signals.copy_chunks([(dst[i], srcs[i]) for i in range(4)], flags, [0, 1, 2, 3], value=2, stream=stream)
    for i in range(4):
        signals.host_wait(flags, i, 2, 10.0)
    stream.synchronize()
    assert torch.equal(dst[:, 0].cpu(), torch.arange(4.0)) and flags.tolist() == [2] * 4
