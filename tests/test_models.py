"""interlace.models: the reference Llama is causal, its KV cache changes nothing, stages compose."""

import torch

from interlace.models import LlamaConfig, LlamaForCausalLM, init_weights
from interlace.models.llama import KVCache, pipeline_stages


def model(seed, **overrides):
    return init_weights(LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, **overrides)), seed).eval()


@torch.no_grad()
def test_causal_later_tokens_do_not_change_earlier_logits(seed):
    m = model(seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, 256, (2, 3), generator=g)
    assert torch.equal(m(ids)[:, :6], m(changed)[:, :6])
    assert not torch.equal(m(ids)[:, 6:], m(changed)[:, 6:])


@torch.no_grad()
def test_cached_prefill_and_decode_match_the_uncached_forward(seed):
    m = model(seed)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(seed))
    full = m(ids)
    cache = KVCache()
    prefill = m(ids[:, :6], cache)
    steps = [m(ids[:, t : t + 1], cache) for t in range(6, 9)]
    torch.testing.assert_close(prefill, full[:, :6], rtol=0, atol=1e-5)  # only the attention shapes differ
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], rtol=0, atol=1e-5)


@torch.no_grad()
def test_stages_compose_to_the_whole_model_exactly(seed):
    m = model(seed)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(seed))
    for stages in (1, 2, 3):
        x = ids
        for stage in pipeline_stages(m, stages):
            x = stage(x)
        assert torch.equal(x, m(ids)), f"{stages} stages"
