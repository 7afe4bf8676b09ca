"""Cutting a stack of layers into pipeline stages: contiguous runs, balanced by count or cost."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from interlace.engine.device import synchronize


def by_count(layers: int, parts: int) -> list[range]:
    """Contiguous ranges whose sizes differ by at most one (earlier parts take the extra)."""
    _check(layers, parts)
    base, extra = divmod(layers, parts)
    edges = [0]
    for i in range(parts):
        edges.append(edges[-1] + base + (1 if i < extra else 0))
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def balance(costs: Sequence[float], parts: int) -> list[range]:
    """Contiguous ranges minimising the largest part's total cost (exact, by dynamic programming
    over prefix sums: O(parts * n^2), fine for a few hundred layers)."""
    n = len(costs)
    _check(n, parts)
    if any(c < 0 for c in costs):
        raise ValueError(f"layer costs must be non-negative, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[k][i]: first i layers in k parts
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                worst = max(best[k - 1][j], prefix[i] - prefix[j])
                if worst < best[k][i]:
                    best[k][i], cut[k][i] = worst, j
    edges, i = [n], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        edges.append(i)
    edges.reverse()
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def measure(layers: Sequence[nn.Module], example: torch.Tensor, repeats: int = 5, **kwargs) -> list[float]:
    """Median seconds of each layer's forward, feeding each layer the previous one's output."""
    costs, x = [], example
    with torch.no_grad():
        for layer in layers:
            samples = []
            for _ in range(repeats):
                synchronize(x)
                start = time.perf_counter()
                y = layer(x, **kwargs)
                synchronize(y)
                samples.append(time.perf_counter() - start)
            costs.append(sorted(samples)[len(samples) // 2])
            x = y
    return costs


def sequential_stages(layers: Sequence[nn.Module], parts: int, costs: Sequence[float] | None = None) -> list[nn.Sequential]:
    """Any stack of layers (each ``x -> x``) as ``parts`` nn.Sequential stages."""
    ranges = balance(costs, parts) if costs is not None else by_count(len(layers), parts)
    return [nn.Sequential(*(layers[i] for i in r)) for r in ranges]


def _check(layers: int, parts: int) -> None:
    if not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be a positive int, got {parts!r}")
    if parts > layers:
        raise ValueError(f"cannot cut {layers} layers into {parts} non-empty stages")
