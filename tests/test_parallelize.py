"""parallelize(): Hugging Face LlamaForCausalLM and interlace's reference model, TP 2 and 4.

Logits are held to reference.assert_no_worse against the float64 unsharded model (the sharded
fp32 model may be no further from it than 4x the unsharded fp32 model is); greedy generation of
16 tokens with the model's own KV cache must give identical tokens.
"""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM as HFLlama

from interlace import parallelize
from interlace.engine.comm import spawn
from interlace.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from interlace.models import LlamaConfig, LlamaForCausalLM, init_weights
from reference import assert_no_worse

NEW_TOKENS = 16


def hf_model(seed, **overrides):
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(seed)
    return HFLlama(HFConfig(**{**cfg, **overrides})).eval()


def reference_model(seed, **overrides):
    return init_weights(LlamaForCausalLM(LlamaConfig(**overrides)), seed).eval()


def logits_of(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def generate(model, ids):
    if isinstance(model, HFLlama):
        return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return model.generate(ids, NEW_TOKENS)


def tp_body(group, ref, sequence_parallel, strategy, seed):
    """Each rank shards its own copy, on the group's device; logits and greedy tokens are compared
    with the unsharded model's on the CPU."""
    vocab = ref.config.vocab_size
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))
    model = parallelize(copy.deepcopy(ref).to(group.device), group, sequence_parallel=sequence_parallel, overlap=strategy)
    with torch.no_grad():
        exact = logits_of(copy.deepcopy(ref).double(), ids)
        assert_no_worse(logits_of(model, ids.to(group.device)), logits_of(ref, ids), exact, f"rank {group.rank} logits")
        tokens, expected = generate(model, ids.to(group.device)).cpu(), generate(ref, ids)
    assert tokens.shape == (2, 7 + NEW_TOKENS)
    assert torch.equal(tokens, expected), f"rank {group.rank}: generated {tokens.tolist()} != {expected.tolist()}"
    return True


MODES = [pytest.param(sp, st, id=f"{'sp' if sp else 'tp'}-{st}") for sp in (False, True) for st in ("bulk", "chunked")]


@pytest.mark.parametrize("world_size", [2, 4], ids=["tp2-kv-split", "tp4-kv-replicated"])
@pytest.mark.parametrize("sequence_parallel,strategy", MODES)
def test_hugging_face_llama(world_size, sequence_parallel, strategy, seed):
    ref = hf_model(seed)
    assert spawn(tp_body, world_size, "local", timeout=60, args=(ref, sequence_parallel, strategy, seed)) == [True] * world_size


def test_hugging_face_llama_over_gloo_processes(seed):
    ref = hf_model(seed)
    assert spawn(tp_body, 2, "gloo", timeout=60, args=(ref, True, "chunked", seed)) == [True, True]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("sequence_parallel,strategy", MODES)
def test_reference_model(world_size, sequence_parallel, strategy, seed):
    ref = reference_model(seed)
    assert spawn(tp_body, world_size, "local", args=(ref, sequence_parallel, strategy, seed)) == [True] * world_size


@pytest.mark.interpreter
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_reference_model_fused(sequence_parallel, seed):
    """overlap='fused': one Triton GEMM per collective, over symmetric memory (interpreted here)."""
    ref = reference_model(seed)
    assert spawn(tp_body, 2, "local", timeout=120, args=(ref, sequence_parallel, "fused", seed)) == [True, True]


@pytest.mark.gpu
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("strategy", ["chunked", "fused"])
@pytest.mark.parametrize("world_size", [2, 4], ids=["tp2-kv-split", "tp4-kv-replicated"])
def test_hugging_face_llama_on_one_gpu(world_size, strategy, sequence_parallel, seed):
    """LocalGroup on the GPU, a stream per rank; fused runs the fused operators its mode calls for
    (without SP, decode's all-reduce + residual + RMSNorm too)."""
    ref = hf_model(seed)
    fused = (["ag_gemm", "gemm_rs"] if sequence_parallel else ["ar_norm", "gemm_ar"]) if strategy == "fused" else []
    per_rank = spawn(fused_patterns_body, world_size, "local", timeout=60, device="cuda", args=(ref, sequence_parallel, strategy, seed))
    assert per_rank == [fused] * world_size


def fused_patterns_body(group, ref, sequence_parallel, strategy, seed):
    """``tp_body``; then the patterns of the fused operators the group made."""
    assert tp_body(group, ref, sequence_parallel, strategy, seed)
    return sorted({key[0] for key in group.__dict__.get("_fused_workspaces", {})})


def epilogue_body(group, ref, seed):
    """overlap='fused' without sequence parallelism: every decoder layer fuses decode's attention
    all-reduce, residual add and RMSNorm; prefill (2 x 7 rows) and decode (2 rows) both use it."""
    assert tp_body(group, ref, False, "fused", seed)
    model = parallelize(copy.deepcopy(ref), group, overlap="fused")
    assert {layer.fused_epilogue for layer in model.model.layers} == {"on: calls of at most 16 token rows in eval mode without autograd"}
    return sorted(key[1] for key in group.__dict__["_fused_workspaces"] if key[0] == "ar_norm")


@pytest.mark.interpreter
@pytest.mark.parametrize("make", [hf_model, reference_model], ids=["hugging-face", "reference"])
def test_decoder_layers_fuse_the_decode_epilogue(make, seed):
    assert spawn(epilogue_body, 2, "local", timeout=120, args=(make(seed), seed)) == [[2, 14]] * 2


class OnePlusRMSNorm(nn.Module):
    """Gemma's norm: ``x * rsqrt(mean(x^2) + eps) * (1 + weight)``, not the one the kernel computes."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(hidden) * 0.1), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def unfusable_body(group, ref, seed):
    model = parallelize(copy.deepcopy(ref), group, overlap="fused")
    ids = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(seed))
    with torch.enable_grad():  # autograd on: no layer fuses its epilogue
        grad_logits = logits_of(model, ids)
    assert not any(key[0] == "ar_norm" for key in group.__dict__.get("_fused_workspaces", {}))
    with torch.no_grad():
        exact = logits_of(copy.deepcopy(ref).double(), ids)
        assert_no_worse(logits_of(model, ids), logits_of(ref, ids), exact, "no-grad")
        assert_no_worse(grad_logits.detach(), logits_of(ref, ids), exact, "with autograd")
    return [layer.fused_epilogue for layer in model.model.layers]


@pytest.mark.interpreter
def test_layers_that_cannot_fuse_the_epilogue_say_why_and_stay_exact(seed):
    ref = reference_model(seed, num_hidden_layers=3)
    ref.model.layers[1].post_attention_layernorm = OnePlusRMSNorm(64)
    ref.model.layers[2].self_attn.o_proj = nn.Linear(64, 64, bias=True)
    states = spawn(unfusable_body, 2, "local", timeout=120, args=(ref, seed))[0]
    assert states == ["on: calls of at most 16 token rows in eval mode without autograd",
                      "off: post_attention_layernorm (OnePlusRMSNorm) does not compute weight * x * rsqrt(mean(x^2) + eps)",
                      "off: self_attn.o_proj is not a linear layer without bias"]  # fmt: skip


def checkpointed_body(group, ref, seed):
    """Calls the fused epilogue does not take (training mode, autograd) go to the layer's own
    forward: Hugging Face's gradient checkpointing still runs, and no fused all-reduce + norm is made."""
    model = parallelize(copy.deepcopy(ref), group, overlap="fused")
    # transformers 5.23 (ours) calls it activation checkpointing, and warns at the old name; 5.17 (the GPU box's) has the old one only
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    checkpointed = []
    for layer in model.model.layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, inner=inner, **k: checkpointed.append(1) or inner(*a, **k)
    ids = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(seed))
    model(ids).logits.sum().backward()
    with_grad = len(checkpointed)
    with torch.no_grad():  # training mode without autograd (a checkpointed step's first forward, in older transformers)
        model(ids)
    made = [key for key in group.__dict__.get("_fused_workspaces", {}) if key[0] == "ar_norm"]
    return with_grad, made


@pytest.mark.interpreter
def test_calls_the_epilogue_does_not_take_keep_the_layers_own_forward(seed):
    assert spawn(checkpointed_body, 2, "local", timeout=120, args=(hf_model(seed), seed)) == [(2, [])] * 2


def tied_body(group, ref, seed):
    model = parallelize(copy.deepcopy(ref), group)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return tp_body(group, ref, False, "chunked", seed)


def test_tied_embeddings_stay_tied(seed):
    ref = reference_model(seed, tie_word_embeddings=True)
    assert spawn(tied_body, 2, "local", args=(ref, seed)) == [True, True]


def convert_body(group, ref, kwargs):
    model = copy.deepcopy(ref)
    try:
        parallelize(model, group, **kwargs)
    except (ValueError, TypeError) as error:
        untouched = all(type(m) is not ColumnParallelLinear for m in model.modules())
        return type(error).__name__, str(error), untouched
    return "converted", type(model.model.embed_tokens).__name__, None


BAD_MODELS = [
    ("heads", dict(), 3, r"num_attention_heads=4 is not divisible by the group's world size 3"),
    ("kv", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3), 2,
     r"num_key_value_heads=3 is incompatible with world size 2: one must divide the other"),
    ("vocab", dict(vocab_size=130), 4, r"vocab_size=130 not divisible by the group's world size 4"),
    ("ffn", dict(intermediate_size=126), 4, r"intermediate_size=126 not divisible by the group's world size 4"),
]  # fmt: skip


@pytest.mark.parametrize("case,overrides,world_size,message", BAD_MODELS, ids=[c[0] for c in BAD_MODELS])
def test_incompatible_models_are_rejected_before_any_change(case, overrides, world_size, message):
    ref = reference_model(0, **overrides)
    for kind, text, untouched in spawn(convert_body, world_size, "local", args=(ref, {})):
        assert kind == "ValueError" and untouched
        assert __import__("re").search(message, text), text


def test_unknown_modules_are_named_not_silently_replicated():
    ref = reference_model(0)
    ref.model.layers[1].self_attn.gate = nn.Linear(64, 4)
    kind, text, untouched = spawn(convert_body, 2, "local", args=(ref, {}))[0]
    assert kind == "ValueError" and untouched
    assert "'model.layers.1.self_attn.gate' (Linear: weight [4, 64], bias [4])" in text and "replicate=" in text
    kind, embed, _ = spawn(convert_body, 2, "local", args=(ref, {"replicate": ("model.layers.1.self_attn.gate",)}))[0]
    assert (kind, embed) == ("converted", "VocabParallelEmbedding")


def test_non_llama_models_are_rejected():
    kind, text, _ = spawn(convert_body, 2, "local", args=(nn.Sequential(nn.Linear(4, 4)), {}))[0]
    assert kind == "TypeError" and "expects a Llama-family model with model.embed_tokens" in text


def test_logit_tolerance_can_fail(seed):
    """The logit check catches one weight off by 1e-3 (a small sharding mistake looks like this)."""
    ref = reference_model(seed)
    wrong = copy.deepcopy(ref)
    with torch.no_grad():
        wrong.model.layers[0].mlp.down_proj.weight[3, 5] += 1e-3
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        exact = logits_of(copy.deepcopy(ref).double(), ids)
        assert_no_worse(logits_of(ref, ids), logits_of(ref, ids), exact, "control")
        with pytest.raises(AssertionError, match="max error"):
            assert_no_worse(logits_of(wrong, ids), logits_of(ref, ids), exact, "perturbed")


def layer_errors_body(group):
    errors = {}
    for name, make in {
        "columns": lambda: ColumnParallelLinear(24, 10, group),
        "vocab": lambda: VocabParallelEmbedding(30, 8, group),
        "width": lambda: ColumnParallelLinear(24, 8, group)(torch.ones(3, 20)),
        "row_width": lambda: RowParallelLinear(24, 8, group)(torch.ones(3, 7)),
        "head_width": lambda: ParallelLMHead(24, 8, group)(torch.ones(2, 25)),
    }.items():
        try:
            make()
        except ValueError as error:
            errors[name] = str(error)
    return errors


def test_layer_shape_errors_name_the_numbers():
    errors = spawn(layer_errors_body, 4, "local")[1]
    assert errors["columns"] == "rank 1: ColumnParallelLinear out_features=10 is not divisible by 4 shards (world size 4)"
    assert errors["vocab"] == "rank 1: VocabParallelEmbedding num_embeddings=30 is not divisible by 4 shards (world size 4)"
    assert errors["width"] == "rank 1: ColumnParallelLinear expects in_features = 24 input features, got input of shape [3, 20]"
    assert errors["row_width"] == "rank 1: RowParallelLinear expects in_features/world_size (24/4) = 6 input features, got input of shape [3, 7]"
    assert errors["head_width"] == "rank 1: ParallelLMHead expects in_features = 24 input features, got input of shape [2, 25]"


def test_overlap_config_is_validated():
    from interlace import OverlapConfig

    with pytest.raises(ValueError, match="strategy must be one of \\('bulk', 'chunked', 'fused', 'auto'\\), got 'ring'"):
        OverlapConfig(strategy="ring")
    with pytest.raises(ValueError, match="chunks must be a positive int, got 0"):
        OverlapConfig(strategy="chunked", chunks=0)
    with pytest.raises(ValueError, match=r"shots must be 1 \(one-shot\) or 2 \(two-shot\), got 3"):
        OverlapConfig(strategy="fused", shots=3)
    with pytest.raises(ValueError, match="norm_rows must be a non-negative int, got -1"):
        OverlapConfig(strategy="fused", norm_rows=-1)
