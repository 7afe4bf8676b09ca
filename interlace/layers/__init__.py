"""Drop-in tensor-parallel nn.Modules and parallelize()."""

from .embedding import ParallelLMHead, VocabParallelEmbedding
from .linear import ColumnParallelLinear, RowParallelLinear
from .mlp import ParallelMLP
from .parallelize import parallelize

__all__ = ["ColumnParallelLinear", "ParallelLMHead", "ParallelMLP", "RowParallelLinear", "VocabParallelEmbedding", "parallelize"]
