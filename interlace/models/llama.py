"""A small self-contained Llama-style causal LM: no download, no transformers.

Module names and call conventions follow Hugging Face's Llama (``model.embed_tokens``,
``model.layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``model.norm``,
``lm_head``; attention reads ``num_key_value_groups`` at run time), so ``interlace.parallelize``
converts both with the same code. Greedy generation with a KV cache is built in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True, slots=True)
class LlamaConfig:
    vocab_size: int = 256
    """Tokens in the vocabulary."""
    hidden_size: int = 64
    """Model width H."""
    intermediate_size: int = 128
    """Gated MLP width."""
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    """Grouped-query attention: query heads share key/value heads in groups."""
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def tiny() -> LlamaConfig:
    """For tests: 2 layers, width 64, 4 query heads sharing 2 key/value heads."""
    return LlamaConfig()


def small() -> LlamaConfig:
    """For CPU demos: 4 layers, width 512, 8 query heads sharing 4 key/value heads."""
    return LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4)  # fmt: skip


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(hidden)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """Per-layer keys and values seen so far, [batch, kv_heads, tokens, head_dim]."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def length(self, layer: int | None = None) -> int:
        """Tokens cached for ``layer`` (before the current step writes it), or for any layer."""
        if layer is not None:
            return self.layers[layer][0].shape[2] if layer in self.layers else 0
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.layers:
            k = torch.cat([self.layers[layer][0], k], dim=2)
            v = torch.cat([self.layers[layer][1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx, self.head_dim = layer_idx, d
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(self, hidden_states, *, position_embeddings, cache: KVCache | None = None):
        batch, tokens = hidden_states.shape[:2]
        shape = (batch, tokens, -1, self.head_dim)  # -1: head counts follow the (sharded) weights
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = _rotate(q, *position_embeddings), _rotate(k, *position_embeddings)
        past = cache.length(self.layer_idx) if cache is not None else 0
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        visible = torch.arange(k.shape[2], device=q.device) <= past + torch.arange(tokens, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), None


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj, self.act_fn = nn.Linear(f, h, bias=False), F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden_states, *, position_embeddings, cache=None):
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), position_embeddings=position_embeddings, cache=cache)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Model(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        rope = self.rope(input_ids.shape[1], cache, hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=rope, cache=cache)
        return self.norm(hidden_states)

    def rope(self, tokens: int, cache: KVCache | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin) for ``tokens`` positions after those already in ``cache``."""
        past = cache.length() if cache is not None else 0
        positions = torch.arange(past, past + tokens, device=like.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [batch, tokens, vocab]."""
        return self.lm_head(self.model(input_ids, cache))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a KV cache; returns prompt and new tokens."""
        cache, tokens, step = KVCache(), input_ids, input_ids
        for _ in range(max_new_tokens):
            step = self(step, cache)[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, step], dim=1)
        return tokens


def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic small random weights (std 0.02, norms 1), independent of the global RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02)
    return model


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaStage(nn.Module):
    """One pipeline stage: layers ``layers`` of ``model``, with the embedding on the first stage
    and the final norm and LM head on the last. ``forward(x, cache=None)``: token ids on the
    first stage, hidden states ``[batch, tokens, hidden]`` elsewhere; logits out of the last.
    Computes exactly what the whole model computes for the same microbatch."""

    def __init__(self, model: LlamaForCausalLM, layers: range, *, first: bool, last: bool):
        super().__init__()
        body = model.model
        self.first, self.last, self.layer_ids = first, last, layers
        self.embed_tokens = body.embed_tokens if first else None
        self.layers = nn.ModuleList(body.layers[i] for i in layers)
        self.norm, self.lm_head = (body.norm, model.lm_head) if last else (None, None)
        self._rope = body.rope

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(x) if self.first else x
        rope = self._rope(hidden_states.shape[1], cache, hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings=rope, cache=cache)
        return self.lm_head(self.norm(hidden_states)) if self.last else hidden_states


def pipeline_stages(model: LlamaForCausalLM, stages: int, costs: list[float] | None = None) -> list[LlamaStage]:
    """Cut ``model`` into ``stages`` stages of contiguous layers, balanced by layer count or, given
    one cost per layer (see ``interlace.engine.pipeline.split.measure``), by cost."""
    from interlace.engine.pipeline.split import balance, by_count

    n = len(model.model.layers)
    ranges = balance(costs, stages) if costs is not None else by_count(n, stages)
    return [LlamaStage(model, r, first=i == 0, last=i == stages - 1) for i, r in enumerate(ranges)]
