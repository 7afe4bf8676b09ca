"""Independent references for collective tests: deterministic per-rank inputs and float64 results.

Every rank can regenerate every other rank's input from (seed, iteration, rank), so each rank
checks its own output against a reference computed without the transport under test.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = (*FLOAT_DTYPES, torch.int32)


def rank_input(seed: int, iteration: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank-dependent random data: scale grows with the rank so a wrong rank's data shows."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration * 1_009 + rank)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * (rank + 1)).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=torch.int64).to(dtype)


def step_shape(seed: int, iteration: int, world_size: int, ndim: int = 2) -> tuple[int, ...]:
    """A shape shared by all ranks at one step; dim 0 divisible by the world size."""
    g = torch.Generator().manual_seed(seed * 31 + iteration)
    rows = world_size * int(torch.randint(1, 4, (1,), generator=g))
    return (rows, *(int(d) for d in torch.randint(1, 6, (ndim - 1,), generator=g)))


def rows(t: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    n = t.shape[0] // parts
    return t[index * n : (index + 1) * n]


def reduce64(parts: list[torch.Tensor], op: str) -> torch.Tensor:
    """The exact reduction, in float64 (exact for our int32 ranges too)."""
    stacked = torch.stack([p.to(torch.float64) for p in parts])
    if op == "max":
        return stacked.max(dim=0).values
    total = stacked.sum(dim=0)
    return total / len(parts) if op == "avg" else total


def reduction_tolerance(parts: list[torch.Tensor], dtype: torch.dtype, op: str) -> torch.Tensor:
    """Elementwise bound on |result - exact| for any summation order in ``dtype``.

    Max and integer sums are exact. A float sum of W terms rounds at most W-1 partial sums and the
    final result, each by at most u = eps/2 times a magnitude bounded by S = sum_i |x_i|, so the
    error is at most W*u*S; we allow W*eps*S (2x margin). An average divides that by W and adds
    one more rounding (premultiplied averages obey the same bound).
    """
    if op == "max" or not dtype.is_floating_point:
        return torch.zeros(parts[0].shape, dtype=torch.float64)
    eps, w = torch.finfo(dtype).eps, len(parts)
    magnitude = torch.stack([p.to(torch.float64).abs() for p in parts]).sum(dim=0)
    bound = w * eps * magnitude
    return bound / w + eps * magnitude / w if op == "avg" else bound


def assert_reduction_close(out: torch.Tensor, parts: list[torch.Tensor], op: str, what: str) -> None:
    expected = reduce64(parts, op)
    tol = reduction_tolerance(parts, out.dtype, op)
    err = (out.to(torch.float64) - expected).abs()
    bad = err > tol
    if bool(bad.any()) or not bool(torch.isfinite(out.to(torch.float64)).all()):
        i = int(torch.argmax((err - tol).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} elements outside tolerance; worst at flat index {i}: "
            f"got {out.flatten()[i].item()}, expected {expected.flatten()[i].item()}, tol {tol.flatten()[i].item():.3g}"
        )


def assert_exact(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if out.dtype != expected.dtype or out.shape != expected.shape or not torch.equal(out, expected):
        raise AssertionError(f"{what}: got {out.dtype}{list(out.shape)}, expected {expected.dtype}{list(expected.shape)}; "
                             f"first values {out.flatten()[:4].tolist()} vs {expected.flatten()[:4].tolist()}")


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with values no correct result contains, so stale data shows."""
    return t.fill_(float("nan") if t.dtype.is_floating_point else torch.iinfo(t.dtype).min)


def matmul_tolerance(magnitude: torch.Tensor, dtype: torch.dtype, accumulated: int, roundings: int) -> torch.Tensor:
    """Elementwise bound on |computed - exact| for a (sharded, reduced) product in ``dtype``.

    ``magnitude`` is |a| @ |b| in float64, which bounds every partial sum. Accumulating
    ``accumulated`` terms in fp32 (what CPU and GPU GEMMs do for every dtype here) errs by at most
    accumulated*u32*magnitude; each of ``roundings`` roundings to ``dtype`` (per-rank partials,
    their sum, the output) by at most u*magnitude. We allow eps = 2u per step: a 2x margin.
    """
    return magnitude * (accumulated * torch.finfo(torch.float32).eps + roundings * torch.finfo(dtype).eps)


def assert_within(got: torch.Tensor, exact: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """``got`` on any device; ``exact`` and ``tol`` float64 on the CPU."""
    got = got.detach().to("cpu", torch.float64)
    err = (got - exact).abs()
    if bool((err > tol).any()) or not bool(torch.isfinite(got).all()):
        i = int(torch.argmax((err - tol).flatten()))
        raise AssertionError(
            f"{what}: {int((err > tol).sum())} of {err.numel()} elements outside tolerance; worst at flat index {i}: "
            f"got {got.flatten()[i].item()}, expected {exact.flatten()[i].item()}, tol {tol.flatten()[i].item():.3g}"
        )


def assert_no_worse(got: torch.Tensor, unsharded: torch.Tensor, exact: torch.Tensor, what: str, factor: float = 4.0) -> None:
    """For composite modules (MLPs, whole models) whose error bound is impractical to write down:
    the sharded result may be no further from the float64 truth than ``factor`` times the
    unsharded module's own error (max norm), plus a floor of 8 eps of the output's scale."""
    truth = exact.to("cpu", torch.float64)
    own = (unsharded.detach().to("cpu", torch.float64) - truth).abs().max().item()
    err = (got.detach().to("cpu", torch.float64) - truth).abs().max().item()
    floor = 8 * torch.finfo(got.dtype).eps * truth.abs().max().item()
    if not err <= factor * own + floor:
        raise AssertionError(f"{what}: max error {err:.3g} vs float64, unsharded {own:.3g}; allowed {factor * own + floor:.3g}")


def make_linear(seed: int, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> torch.nn.Linear:
    """The same nn.Linear on every rank (explicit generator: rank threads share the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=g) / in_features**0.5)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=g))
    return layer


def rand(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
