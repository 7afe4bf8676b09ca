"""parallelize(): convert a Llama-family causal LM (Hugging Face or interlace.models) in place."""

from __future__ import annotations

from torch import nn

from interlace.engine.comm import Group
from interlace.engine.overlap import OverlapConfig, as_config

from .decoder import epilogue_blocker, fuse_epilogue
from .embedding import ParallelLMHead, VocabParallelEmbedding
from .linear import ColumnParallelLinear, RowParallelLinear
from .mlp import ParallelMLP
from .sequence_parallel import SequenceParallel

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def parallelize(
    model: nn.Module,
    group: Group,
    *,
    sequence_parallel: bool = False,
    overlap: OverlapConfig | str | None = None,
    replicate: tuple[str, ...] = (),
) -> nn.Module:
    """Shard ``model`` over ``group`` (tensor parallelism) in place and return it.

    Collective in spirit: every rank calls it on its own full copy of the model and keeps its
    shard. Converts the token embedding (vocabulary-parallel), q/k/v (column) and o (row)
    projections, gate/up (column) and down (row) MLP projections, and the LM head (vocabulary-
    parallel, logits gathered). Query heads are split over ranks; key/value heads are split when
    their count is divisible by the world size and replicated when the world size is a multiple
    of it. ``sequence_parallel`` shards the token stream between blocks (see
    sequence_parallel.py); ``overlap`` picks how every layer overlaps its collective with its GEMM.
    With ``"fused"`` (and no sequence parallelism), decoder layers also fuse decode's attention
    all-reduce with the residual add and RMSNorm where they can (decoder.py; each layer's
    ``fused_epilogue`` says whether and why).

    Every module with parameters must be one of those, a norm, or named in ``replicate`` (kept
    whole on every rank, deliberately): anything else raises before the model is touched.
    """
    config = as_config(overlap)
    body = getattr(model, "model", model)
    _check_known(model, body, replicate)
    attentions = [layer.self_attn for layer in body.layers]
    heads = [_head_split(attn, group) for attn in attentions]  # validates every layer first
    _check_divisible(body, group)
    fuse = config.strategy == "fused" and config.norm_rows > 0 and not sequence_parallel
    blockers = [epilogue_blocker(layer, group) if fuse else None for layer in body.layers]  # runs each norm once
    kw = dict(sequence_parallel=sequence_parallel, overlap=config)
    for layer, attn, (q_heads, kv_shards, kv_index), blocker in zip(body.layers, attentions, heads, blockers):
        _convert_attention(attn, group, q_heads, kv_shards, kv_index, **kw)
        layer.mlp = ParallelMLP.from_mlp(layer.mlp, group, **kw)
        if fuse:
            fuse_epilogue(layer, group, config, blocker)
    _convert_ends(model, body, group, config)
    if sequence_parallel:
        _add_sequence_parallel(body, attentions, group)
    return model


def _check_known(model: nn.Module, body: nn.Module, replicate: tuple[str, ...]) -> None:
    for part in ("embed_tokens", "layers", "norm"):
        if not hasattr(body, part):
            raise TypeError(f"parallelize expects a Llama-family model with model.{part} (e.g. LlamaForCausalLM); "
                            f"{type(model).__name__} has none")  # fmt: skip
    unknown = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or name in replicate or type(module).__name__.endswith("Norm") or _is_known(name):
            continue
        shapes = ", ".join(f"{p_name} {list(p.shape)}" for p_name, p in module.named_parameters(recurse=False))
        unknown.append(f"{name!r} ({type(module).__name__}: {shapes})")
    if unknown:
        raise ValueError(
            "parallelize does not know how to shard " + "; ".join(unknown) + ". Left as is, each would be "
            "computed whole on every rank, or meet sharded inputs it does not expect. Pass "
            "replicate=(<names>) to keep them whole deliberately."
        )


def _is_known(name: str) -> bool:
    parts = name.split(".")
    if parts[-1] in ("embed_tokens", "lm_head"):
        return True
    return len(parts) >= 2 and ((parts[-2] == "self_attn" and parts[-1] in ATTENTION) or (parts[-2] == "mlp" and parts[-1] in MLP))


def _head_split(attn: nn.Module, group: Group) -> tuple[int, int, int]:
    """(query heads per rank, key/value shards, this rank's key/value shard), or a clear error."""
    w, d = group.world_size, attn.head_dim
    heads, kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    if heads % w:
        raise ValueError(f"num_attention_heads={heads} is not divisible by the group's world size {w}")
    if kv % w == 0:
        return heads // w, w, group.rank
    if w % kv == 0:
        return heads // w, kv, group.rank // (w // kv)  # replicated: w/kv ranks share each kv head
    raise ValueError(f"num_key_value_heads={kv} is incompatible with world size {w}: one must divide the other "
                     f"(split kv heads when kv % w == 0, replicate them when w % kv == 0)")  # fmt: skip


def _check_divisible(body: nn.Module, group: Group) -> None:
    w = group.world_size
    sizes = {"vocab_size": body.embed_tokens.num_embeddings}
    if len(body.layers):
        sizes["intermediate_size"] = body.layers[0].mlp.gate_proj.out_features
    bad = [f"{name}={n}" for name, n in sizes.items() if n % w]
    if bad:
        raise ValueError(f"{', '.join(bad)} not divisible by the group's world size {w}")


def _convert_attention(attn, group, q_heads, kv_shards, kv_index, *, sequence_parallel, overlap) -> None:
    attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, group, overlap=overlap)
    attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, group, shards=kv_shards, index=kv_index, overlap=overlap)
    attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, group, shards=kv_shards, index=kv_index, overlap=overlap)
    attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, group, sequence_parallel=sequence_parallel, overlap=overlap)
    kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
    attn.num_key_value_groups = q_heads // kv_heads
    for name, value in (("num_heads", q_heads), ("num_key_value_heads", kv_heads)):
        if hasattr(attn, name):  # older transformers read these in forward
            setattr(attn, name, value)


def _convert_ends(model: nn.Module, body: nn.Module, group: Group, config: OverlapConfig) -> None:
    embed = body.embed_tokens
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is embed.weight
    body.embed_tokens = VocabParallelEmbedding.from_embedding(embed, group)
    if head is not None:
        model.lm_head = ParallelLMHead.from_linear(head, group, overlap=config)
        if tied:  # both hold rows [rank*V/W, (rank+1)*V/W): the same shard
            model.lm_head.weight = body.embed_tokens.weight


def _add_sequence_parallel(body: nn.Module, attentions: list[nn.Module], group: Group) -> None:
    seq = SequenceParallel(group)
    if len(body.layers):
        body.layers[0].register_forward_pre_hook(seq.shard_input, with_kwargs=True)
    for attn in attentions:
        attn.register_forward_pre_hook(seq.gather_input, with_kwargs=True)
    body.norm.register_forward_hook(seq.gather_output)
