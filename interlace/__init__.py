"""interlace: tensor- and pipeline-parallel communication hidden behind computation."""

__version__ = "0.1.0"
