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
