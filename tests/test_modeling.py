"""The shipped modeling file: short identity, built-in longrope parity, n_hat, per-row sets, cache switching."""

import json

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from conftest import TINY_WINDOW
from longrope_convert.convert import longrope_config
from longrope_convert.factors import FactorSet
from longrope_convert.modeling_longrope_llama import (
    LongRoPELlamaForCausalLM,
    LongRoPEScaledRotaryEmbedding,
    default_long_mscale,
    rope_inv_freq,
)
from longrope_convert.source import read_source

HALF = 8  # tiny model: head_dim 16
RAMP = [1.0 + 3.0 * i / (HALF - 1) for i in range(HALF)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def longrope_pair(folder, long_factor=RAMP, n_hat=0, long_mscale=None, target=4 * TINY_WINDOW):
    """(source model, LongRoPE model with the same weights, LongRoPE config), built through the converter's config."""
    source = LlamaForCausalLM.from_pretrained(folder).eval()
    fingerprint = read_source(folder).fingerprint
    factor_set = FactorSet(
        model=fingerprint, target_length=target, long_factor=list(long_factor), short_factor=[1.0] * HALF,
        n_hat=n_hat, long_mscale=long_mscale or default_long_mscale(target / TINY_WINDOW, TINY_WINDOW),
        provenance={"method": "test"},
    )
    config = LlamaConfig.from_dict(longrope_config(json.loads((folder / "config.json").read_text()), factor_set))
    model = LongRoPELlamaForCausalLM(config).eval()
    model.load_state_dict(source.state_dict())
    return source, model, config


@torch.no_grad()
def test_short_inputs_give_the_source_model_bit_for_bit(tiny_llama_dir):
    source, model, _ = longrope_pair(tiny_llama_dir)
    torch.manual_seed(1)
    for length in (1, 17, TINY_WINDOW):
        ids = torch.randint(3, 256, (2, length))
        assert torch.equal(model(ids).logits, source(ids).logits), length
    ids = torch.randint(3, 256, (2, TINY_WINDOW))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    assert torch.equal(model(ids, attention_mask=mask).logits, source(ids, attention_mask=mask).logits)


@torch.no_grad()
def test_long_inputs_match_transformers_builtin_longrope(tiny_llama_dir):
    _, model, config = longrope_pair(tiny_llama_dir, n_hat=0)
    builtin = LlamaForCausalLM(config).eval()
    builtin.load_state_dict(model.state_dict())
    torch.manual_seed(2)
    for length in (TINY_WINDOW + 1, 200):
        ids = torch.randint(3, 256, (1, length))
        assert relative_error(model(ids).logits, builtin(ids).logits) <= 1e-5
    # and the long set really is in use: the source model differs there
    assert relative_error(model(ids).logits, LlamaForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits) > 1e-3


@torch.no_grad()
def test_first_n_hat_positions_keep_the_original_angles(tiny_llama_dir):
    _, _, config = longrope_pair(tiny_llama_dir, n_hat=8, long_mscale=1.3)
    rotary = LongRoPEScaledRotaryEmbedding(config)
    positions = torch.arange(100)[None]  # 100 > window: long set
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    original = positions[..., None].float() * rope_inv_freq(10000.0, 16)
    scaled = positions[..., None].float() * rope_inv_freq(10000.0, 16, RAMP)
    expected = torch.where(positions[..., None] < 8, original, scaled)
    expected = torch.cat((expected, expected), -1)
    torch.testing.assert_close(cos, expected.cos() * 1.3, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, expected.sin() * 1.3, rtol=0, atol=1e-6)
    assert not torch.allclose(original[0, 8:], scaled[0, 8:])


@torch.no_grad()
def test_each_row_uses_its_own_factor_set(tiny_llama_dir):
    _, model, _ = longrope_pair(tiny_llama_dir)
    torch.manual_seed(3)
    long_row = torch.randint(3, 256, (1, 90))
    short_row = torch.randint(3, 256, (1, 50))
    batch = torch.cat([long_row, torch.cat([torch.zeros(1, 40, dtype=torch.long), short_row], 1)])
    mask = torch.ones_like(batch)
    mask[1, :40] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch, attention_mask=mask, position_ids=positions).logits
    assert relative_error(logits[0], model(long_row).logits[0]) <= 1e-5
    assert relative_error(logits[1, 40:], model(short_row).logits[0]) <= 1e-5


def greedy_logits_vs_recompute(model, ids, mask, new_tokens, **generate_kwargs):
    """Worst relative error between generate()'s per-step logits and a full forward without cache."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, **generate_kwargs)
    worst = 0.0
    for step, step_logits in enumerate(out.logits):
        length = ids.shape[1] + step
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], step, dtype=mask.dtype)], 1)
        positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
        reference = model(out.sequences[:, :length], attention_mask=full_mask, position_ids=positions).logits[:, -1]
        worst = max(worst, relative_error(step_logits, reference))
    return worst


def left_padded_prompts():
    torch.manual_seed(4)
    ids = torch.randint(3, 256, (2, TINY_WINDOW - 3))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # row 1 is 6 tokens shorter: it crosses the window 6 steps later
    ids[1, :6] = 0
    return ids, mask


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@torch.no_grad()
def test_cached_generation_across_the_window_equals_full_recompute(tiny_llama_dir, cache_implementation):
    _, model, _ = longrope_pair(tiny_llama_dir, n_hat=4)
    ids, mask = left_padded_prompts()
    assert greedy_logits_vs_recompute(model, ids, mask, 14, cache_implementation=cache_implementation) <= 1e-5


@torch.no_grad()
def test_builtin_longrope_fails_the_same_check(tiny_llama_dir):
    """The check above can fail: stock transformers keeps short-set keys in the cache after the switch."""
    _, model, config = longrope_pair(tiny_llama_dir)
    builtin = LlamaForCausalLM(config).eval()
    builtin.load_state_dict(model.state_dict())
    ids, mask = left_padded_prompts()
    assert greedy_logits_vs_recompute(builtin, ids[:1], mask[:1], 8) > 1e-3


@torch.no_grad()
def test_manual_cached_loop_and_crop_back_into_the_window(tiny_llama_dir):
    _, model, _ = longrope_pair(tiny_llama_dir)
    torch.manual_seed(5)
    ids = torch.randint(3, 256, (1, TINY_WINDOW + 6))
    cache = DynamicCache(config=model.config)
    model(ids[:, : TINY_WINDOW - 2], cache=cache, use_cache=True)
    for end in range(TINY_WINDOW - 1, ids.shape[1] + 1):  # one token at a time, across the window
        step = model(ids[:, end - 1 : end], cache=cache, use_cache=True).logits[:, -1]
        assert relative_error(step, model(ids[:, :end]).logits[:, -1]) <= 1e-5, end
    cache.crop(-8)  # back inside the window, as assisted decoding does after rejecting candidates
    end = ids.shape[1] - 7
    step = model(ids[:, end - 1 : end], cache=cache, use_cache=True).logits[:, -1]
    assert end <= TINY_WINDOW
    assert relative_error(step, model(ids[:, :end]).logits[:, -1]) <= 1e-5


@torch.no_grad()
def test_unsupported_cache_layout_is_a_clear_error(tiny_llama_dir):
    _, model, config = longrope_pair(tiny_llama_dir)
    cache = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=1000) for _ in range(config.num_hidden_layers)])
    ids = torch.randint(3, 256, (1, TINY_WINDOW + 1))
    model(ids[:, :-1], cache=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="DynamicCache and StaticCache"):
        model(ids[:, -1:], cache=cache, use_cache=True)
