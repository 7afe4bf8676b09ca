"""Overlap of tensor-parallel collectives with GEMMs: configuration, algorithms, autograd wrappers."""

from .config import STRATEGIES, OverlapConfig, as_config, bulk, chunked

__all__ = ["STRATEGIES", "OverlapConfig", "as_config", "bulk", "chunked"]
