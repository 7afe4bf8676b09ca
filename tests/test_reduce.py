"""The one-pass rank-order sum (interlace.kernels.reduce) that fused GEMM+RS/GEMM+AR and the
symmetric all-reduce use on a GPU: the bits of the torch reduction every transport shares, and a
float64 sum within fp32 accumulation error. Under TRITON_INTERPRET=1 on CPU (on the GPU with one);
bf16 bits on the GPU only (the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest)."""

import pytest
import torch

from interlace.engine.comm.reduce import reduce_in_rank_order, reduce_into
from interlace.ops.reduce import sum_parts
from reference import rand

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def parts_for(seed, world, shape, dtype):
    return [(rand(seed + q, shape) * (q + 1)).to(DEVICE, dtype) for q in range(world)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world,shape", [(1, (3, 5)), (2, (40, 40)), (3, (1, 1025)), (5, (17, 130)), (8, (33, 64))])
def test_one_pass_sum_gives_the_bits_of_the_rank_order_reduction(world, shape, dtype, seed):
    parts = parts_for(seed, world, shape, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    sum_parts(parts, out)
    assert torch.equal(out, reduce_in_rank_order(parts, "sum").to(dtype))
    exact = sum(p.double() for p in parts)
    bound = torch.finfo(dtype).eps * exact.abs() + world * torch.finfo(torch.float32).eps * sum(p.double().abs() for p in parts)
    assert ((out.double() - exact).abs() <= bound).all()


def test_reduce_into_writes_views_in_place_and_handles_other_ops(seed):
    parts = parts_for(seed, 3, (12, 8), torch.float32)
    out = torch.zeros(24, 8, device=DEVICE)
    reduce_into([p[4:] for p in parts], "sum", out[:8])  # contiguous row slices, as the fused consumers pass
    assert torch.equal(out[:8], parts[0][4:] + parts[1][4:] + parts[2][4:])
    assert (out[8:] == 0).all()
    reduce_into(parts, "max", out[8:20])
    assert torch.equal(out[8:20], torch.maximum(torch.maximum(parts[0], parts[1]), parts[2]))


@pytest.mark.parametrize("case,message", [
    ("nine", "1 to 8 parts, got 9"),
    ("shape", r"part 1 is float32\[4, 6\]"),
    ("dtype", r"part 0 is float64\[4, 5\]"),
    ("strided", r"part 2 is float32\[4, 5\] on \S+, not contiguous"),
])  # fmt: skip
def test_bad_operands_are_named(case, message):
    out = torch.zeros(4, 5, device=DEVICE)
    parts = [torch.zeros(4, 5, device=DEVICE) for _ in range(3)]
    if case == "nine":
        parts = parts * 3
    elif case == "shape":
        parts[1] = torch.zeros(4, 6, device=DEVICE)
    elif case == "dtype":
        parts[0] = parts[0].double()
    else:
        parts[2] = torch.zeros(5, 4, device=DEVICE).t()
    with pytest.raises(ValueError, match=message):
        sum_parts(parts, out)
