"""interlace: tensor- and pipeline-parallel communication hidden behind computation."""

__version__ = "0.1.0"

from interlace.engine.overlap import OverlapConfig  # noqa: E402
from interlace.layers import parallelize  # noqa: E402

__all__ = ["OverlapConfig", "parallelize"]
