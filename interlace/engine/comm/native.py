"""The compiled extension ``interlace._C``, loaded once, with a clear error when it is missing."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def native() -> ModuleType:
    try:
        from interlace import _C
    except ImportError as error:
        raise ImportError(
            "interlace._C is not built: install the package (`pip install -e .`, or `make test`), "
            f"which needs cmake >= 3.18 and pybind11 ({error})"
        ) from error
    return _C


def build_info() -> dict:
    """What the extension was built with: {"cuda": bool, "cuda_runtime", "cuda_archs", "compiler"}."""
    return dict(native().build_info())
