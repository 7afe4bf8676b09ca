"""How error messages name a tensor: ``float32[4, 3] on cuda:0``."""

from __future__ import annotations

import torch


def describe(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} on {t.device}"
