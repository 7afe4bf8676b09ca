"""Vocabulary-parallel embedding and LM head: each rank holds rows ``[rank*V/W, (rank+1)*V/W)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from interlace.engine.comm import Group
from interlace.engine.overlap import autograd as tp

from .linear import ColumnParallelLinear, _split


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` with the vocabulary split over ranks; every rank gets the full ``[..., H]``.

    Ids outside this rank's range look up zeros and the ranks' results are summed: exactly one
    rank contributes each row, so the sum is exact.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group, *, padding_idx: int | None = None,
                 device=None, dtype=None):  # fmt: skip
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        self.padding_idx = padding_idx
        rows = _split(num_embeddings, group.world_size, "num_embeddings", group, type(self).__name__)
        self.vocab_start = group.rank * rows
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group: Group) -> VocabParallelEmbedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, group, padding_idx=embedding.padding_idx,
                    device=embedding.weight.device, dtype=embedding.weight.dtype)  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(embedding.weight[layer.vocab_start : layer.vocab_start + layer.weight.shape[0]])
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(local.masked_fill(~mine, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return tp.all_reduce_sum(rows, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, world_size={self.group.world_size}, vocab_start={self.vocab_start}"


class ParallelLMHead(ColumnParallelLinear):
    """The output projection split over the vocabulary; logits are gathered so every rank has all."""

    def __init__(self, in_features: int, out_features: int, group: Group, **kwargs):
        kwargs.setdefault("gather_output", True)
        kwargs.setdefault("bias", False)
        super().__init__(in_features, out_features, group, **kwargs)
