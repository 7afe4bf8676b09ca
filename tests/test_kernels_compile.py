"""The Triton kernels compile for the GPUs we target (sm_90a, sm_80) on a machine without one: what
the interpreter cannot show. Each kernel is specialised as a launch specialises it (16-byte aligned
pointers, ints divisible by 16 marked so, ints equal to 1 made constant). The GEMM's mainloop must
then be software-pipelined (async copies; wgmma on Hopper) within the target's shared memory, and
its hooks must be system-scope acquire loads and release adds (peers read them over IPC).

The tests run with TRITON_INTERPRET=1, under which ``@triton.jit`` makes interpreted functions: the
compiling happens once, in a child process without it, which reports what the tests check."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from interlace.kernels import allreduce_norm, flags, reduce
from interlace.kernels import gemm as gemm_kernels

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory a block may use (H100, A100)
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}


def compile_for(kernel, capability: int, pointers: dict, ints: dict, constexprs: dict, num_warps: int, num_stages: int = 1):
    """``kernel`` compiled for ``sm_<capability>`` as a launch with these arguments would compile it."""
    signature, attrs, constants = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in pointers:
            signature[name] = f"*{TRITON_TYPES[pointers[name]]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ints and isinstance(ints[name], float):
            signature[name] = "fp32"
        elif name in ints and kernel.params[i].do_not_specialize:
            signature[name] = "i32"
        elif name in ints and ints[name] == 1:
            signature[name], constants[name] = "constexpr", 1
        elif name in ints:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            assert name in constexprs, f"{kernel.fn.__name__}: no value for argument {name}"
            signature[name] = "constexpr"
    source = ASTSource(kernel, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def compile_gemm(capability, dtype, config, hooks, m=4096, n=4096, k=4096, int64=False):
    pointers = {name: dtype for name in ("x_ptr", "w_ptr", "y_ptr", "bias_ptr", "res_ptr")}
    pointers |= {name: torch.int32 for name in ("flags_ptr", "counters_ptr", "status_ptr", "epoch_ptr")}
    ints = dict(M=m, N=n, K=k, stride_xm=k, stride_xk=1, stride_wn=k, stride_wk=1, stride_ym=n, stride_yn=1, stride_rm=n,
                stride_rn=1, chunk_rows=m // 8, start_chunk=3, patience=60_000_000)  # fmt: skip
    constexprs = dict(config.kwargs, HAS_BIAS=True, HAS_RESIDUAL=True, ACTIVATION=1, WAIT=hooks, SIGNAL=hooks, UPCAST=False,
                      INT64=int64)
    return compile_for(gemm_kernels.gemm_kernel, capability, pointers, ints, constexprs, config.num_warps, config.num_stages)


def instructions(ptx: str) -> set[str]:
    """Memory instructions, and reads of the global timer (``globaltimer``)."""
    return set(re.findall(r"\b(?:ld|st|atom|red)\.[\w.]+", ptx)) | ({"globaltimer"} if "%globaltimer" in ptx else set())


GEMM_TARGETS = {"sm90-bf16": (90, torch.bfloat16), "sm80-fp16": (80, torch.float16)}


def report() -> dict:
    """(In the child) what the tests check, for every GEMM config, the hooks and the fused all-reduce."""
    gemms = {}
    for name, (capability, dtype) in GEMM_TARGETS.items():
        gemms[name] = []
        for config in gemm_kernels.configs(interpreting=False):
            compiled = compile_gemm(capability, dtype, config, hooks=True)
            ttgir = compiled.asm["ttgir"]
            gemms[name].append({"config": str(config), "shared": compiled.metadata.shared, "wgmma": "warp_group_dot" in ttgir,
                                "pipelined": "async_copy_global_to_local" in ttgir})  # fmt: skip
    config = gemm_kernels.configs(interpreting=False)[0]
    hooks = {str(on): sorted(instructions(compile_gemm(90, torch.bfloat16, config, hooks=on).asm["ptx"])) for on in (True, False)}
    wide = compile_gemm(90, torch.bfloat16, config, hooks=True, int64=True).asm["ttgir"]
    int64 = {"wgmma": "warp_group_dot" in wide, "pipelined": "async_copy_global_to_local" in wide}
    loads = {"norm": {}, "sum": {}}  # which global loads each kernel reading peers' rows makes
    for world in (2, 8):
        hidden = 8192
        norm = allreduce_norm.allreduce_residual_rmsnorm_kernel
        ints = dict(hidden=hidden, stride_p=hidden, stride_r=hidden, stride_o=hidden, eps=1e-5)
        compiled = compile_for(norm, 90, dict.fromkeys(norm.arg_names[:12], torch.bfloat16), ints,
                               dict(WORLD=world, BLOCK=allreduce_norm.block_for(hidden)), num_warps=allreduce_norm.warps_for(hidden))  # fmt: skip
        loads["norm"][world] = sorted(i for i in instructions(compiled.asm["ptx"]) if i.startswith("ld.global"))
        sums = reduce.sum_parts_kernel
        compiled = compile_for(sums, 90, dict.fromkeys(sums.arg_names[:9], torch.bfloat16), dict(numel=hidden * 512),
                               dict(WORLD=world, BLOCK=reduce.BLOCK), num_warps=reduce.NUM_WARPS)  # fmt: skip
        loads["sum"][world] = sorted(i for i in instructions(compiled.asm["ptx"]) if i.startswith("ld.global"))
    flag = {}
    for wait in (True, False):
        pointers = {name: torch.int32 for name in ("flags_ptr", "epoch_ptr", "status_ptr")}
        ints = dict(index=3, scale=5, offset=-1, wait_id=2, patience=60_000_000)
        flag[str(wait)] = sorted(instructions(compile_for(flags.flag_kernel, 90, pointers, ints, dict(WAIT=wait), num_warps=1).asm["ptx"]))
    return {"gemm": gemms, "hooks": hooks, "int64": int64, "loads": loads, "flag": flag}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # A cache of its own: one brought from another machine may hold the kernels without their PTX
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_kernels_compile as t; print(json.dumps(t.report()))"
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.splitlines()[-1])


@pytest.mark.parametrize("target", GEMM_TARGETS)
def test_every_gemm_config_compiles_pipelined_within_shared_memory(compiled, target):
    capability = GEMM_TARGETS[target][0]
    for config in compiled["gemm"][target]:
        what = f"{target} {config['config']}"
        assert config["pipelined"], f"{what}: the mainloop is not software-pipelined"
        assert config["wgmma"] == (capability == 90), f"{what}: wgmma on Hopper only"
        assert config["shared"] <= SHARED_LIMIT[capability], f"{what}: {config['shared']} B of shared memory"


def test_the_int64_offsets_variant_keeps_the_fast_mainloop(compiled):
    assert compiled["int64"] == {"wgmma": True, "pipelined": True}


def test_gemm_hooks_are_system_scope_and_cost_nothing_when_off(compiled):
    with_hooks, without = set(compiled["hooks"]["True"]), set(compiled["hooks"]["False"])
    assert "ld.global.sys.acquire.b32" in with_hooks  # WAIT: tl.atomic_add(flag, 0, acquire, sys) lowers to a load
    assert "atom.global.sys.release.add.u32" in with_hooks  # SIGNAL
    assert "globaltimer" in with_hooks  # a wait's bound is a time
    # one timer value for every warp, shared through shared memory (not each warp's own reading)
    assert {"st.shared.b64", "ld.shared.b64"} <= with_hooks
    assert not {i for i in without if i.startswith("atom") or ".sys." in i or i == "globaltimer"}, sorted(without)


@pytest.mark.parametrize("world", ["2", "8"])
@pytest.mark.parametrize("kernel", ["norm", "sum"])
def test_kernels_reading_peers_read_16_byte_vectors(compiled, kernel, world):
    loads = compiled["loads"][kernel][world]
    assert any(".v4." in i or ".v8." in i for i in loads), f"{kernel}: peer rows are not read in 16-byte vectors: {loads}"


def test_flag_kernels_wait_with_acquire_and_write_with_release_at_system_scope(compiled):
    wait, write = set(compiled["flag"]["True"]), set(compiled["flag"]["False"])
    assert "ld.global.sys.acquire.b32" in wait and "globaltimer" in wait, sorted(wait)
    assert "globaltimer" not in write
    assert any(i.startswith("atom.global.sys.release.exch") for i in write), sorted(write)
