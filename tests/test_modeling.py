"""The shipped modeling file: short identity in every dtype and after casts, built-in longrope parity, n_hat,
per-row sets, packed documents, cache switching.

These tests also run under the oldest supported transformers release and one in the middle
(test_transformers_releases.py): keep them fast and independent of the installed release.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from conftest import TINY_WINDOW
from longrope_convert.convert import longrope_config, write_checkpoint
from longrope_convert.modeling_longrope_llama import (
    CACHE_KEYWORD,
    LongRoPEScaledRotaryEmbedding,
    rope_inv_freq,
)
from longrope_convert.perplexity import load_longrope_model
from longrope_convert.source import read_source
from longrope_models import RAMP, left_padded, longrope_pair, relative_error, tiny_factor_set


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
def test_the_scale_below_n_hat_is_the_rows_unless_the_config_says_short(tiny_llama_dir):
    """longrope.n_hat_mscale: absent (every checkpoint written before the key) is "row", bit for bit: the first
    n_hat positions of a long row get the long mscale like the others. "short" gives them the short set's (1.0
    here: the source's cos and sin), leaves every other position and short rows as they were."""
    _, _, config = longrope_pair(tiny_llama_dir, n_hat=8, long_mscale=1.3)
    outputs = {}
    for convention in (None, "row", "short"):
        extras = {key: value for key, value in config.longrope.items() if key != "n_hat_mscale"}
        config.longrope = extras if convention is None else {**extras, "n_hat_mscale": convention}
        rotary = LongRoPEScaledRotaryEmbedding(config)
        outputs[convention] = [rotary(torch.zeros(1), torch.arange(length)[None]) for length in (100, TINY_WINDOW)]
    (row_long, row_short), (short_long, short_short) = outputs["row"], outputs["short"]
    for absent, row in zip(outputs[None], outputs["row"]):
        assert all(torch.equal(a, b) for a, b in zip(absent, row))
    assert all(torch.equal(a, b) for a, b in zip(short_short, row_short))  # short rows: one scale either way
    for short, row in zip(short_long, row_long):  # cos, sin of the long row
        assert torch.equal(short[:, 8:], row[:, 8:])
        torch.testing.assert_close(short[:, :8], row[:, :8] / 1.3, rtol=0, atol=1e-6)
    config.longrope = {**config.longrope, "n_hat_mscale": "long"}
    with pytest.raises(ValueError, match="n_hat_mscale must be 'row' or 'short'"):
        LongRoPEScaledRotaryEmbedding(config)


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
    for given_positions in (positions, None):  # without positions, a padded row's own tokens are counted
        logits = model(batch, attention_mask=mask, position_ids=given_positions).logits
        assert relative_error(logits[0], model(long_row).logits[0]) <= 1e-5
        assert relative_error(logits[1, 40:], model(short_row).logits[0]) <= 1e-5
    right_padded = torch.cat([long_row, torch.cat([short_row, torch.zeros(1, 40, dtype=torch.long)], 1)])
    logits = model(right_padded, attention_mask=mask.flip(-1)).logits
    assert relative_error(logits[1, :50], model(short_row).logits[0]) <= 1e-5


def packed_row(*documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row packing `documents` ([1, length] each): ids [1, total] and positions restarting at 0 for each."""
    return torch.cat(documents, 1), torch.cat([torch.arange(document.shape[1]) for document in documents])[None]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_packed_documents_each_use_their_own_factor_set(tiny_llama_dir, attn_implementation):
    """A row packing a 50-token document and an 80-token one (positions restarting at 0, no mask, as
    DataCollatorWithFlattening makes them), in either order: the short document is the source, bit for bit, the
    long one uses the long set, each as if it ran alone. Eager attention gives the same bits packed as alone; SDPA
    masks a packed row explicitly, so there the short document is compared with the source on the same row."""
    source, model, _ = longrope_pair(tiny_llama_dir, n_hat=4)
    source.set_attn_implementation(attn_implementation)
    model.set_attn_implementation(attn_implementation)
    short, long = left_padded(1, 50, padding=0, seed=8)[0], left_padded(1, 80, padding=0, seed=9)[0]
    for order in ((short, long), (long, short)):
        ids, positions = packed_row(*order)
        logits = model(ids, position_ids=positions, use_cache=False).logits[0]
        stock = source(ids, position_ids=positions, use_cache=False).logits[0]
        short_tokens = slice(0, 50) if order[0] is short else slice(80, 130)
        long_tokens = slice(50, 130) if order[0] is short else slice(0, 80)
        assert torch.equal(logits[short_tokens], stock[short_tokens])
        if attn_implementation == "eager":
            assert torch.equal(logits[short_tokens], source(short).logits[0])
        assert relative_error(logits[long_tokens], model(long).logits[0]) <= 1e-5


@torch.no_grad()
def test_packed_rows_are_not_continued_from_a_cache(tiny_llama_dir):
    """transformers keeps packed documents apart only without a cache: a step after cached tokens that packs
    documents, or that follows packed documents, is refused in one line."""
    _, model, _ = longrope_pair(tiny_llama_dir)
    first, second = left_padded(1, 50, padding=0, seed=10)[0], left_padded(1, 20, padding=0, seed=11)[0]
    ids, positions = packed_row(first, second)
    packed = model(ids, position_ids=positions, use_cache=True)  # allowed: nothing cached before it
    with pytest.raises(ValueError, match="packed documents"):
        model(second[:, -1:], position_ids=positions[:, -1:] + 1, use_cache=True,
              **{CACHE_KEYWORD: getattr(packed, CACHE_KEYWORD)})
    cached = model(first[:, :10], use_cache=True)
    with pytest.raises(ValueError, match="packed documents"):
        model(ids[:, 10:], position_ids=positions[:, 10:], use_cache=True,
              **{CACHE_KEYWORD: getattr(cached, CACHE_KEYWORD)})


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
    """Two prompts 3 tokens short of the window; row 1 is left-padded by 6, so it crosses 6 steps after row 0."""
    return left_padded(2, TINY_WINDOW - 3, padding=6, seed=4)


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


@pytest.mark.parametrize("prompt_as", ["ids", "embeddings"])
@torch.no_grad()
def test_manual_loop_fed_the_cache_the_model_returned(tiny_llama_dir, prompt_as):
    """out = model(prompt, use_cache=True), then one token at a time with the returned cache, across the window:
    the source's logits inside it, a recompute without cache beyond it."""
    source, model, _ = longrope_pair(tiny_llama_dir, n_hat=4)
    ids = left_padded(1, TINY_WINDOW + 4, padding=0, seed=6)[0]
    prompt = ids[:, : TINY_WINDOW - 3]
    if prompt_as == "ids":
        out, stock = model(prompt, use_cache=True), source(prompt, use_cache=True)
    else:
        out = model(inputs_embeds=model.model.embed_tokens(prompt), use_cache=True)
        stock = source(inputs_embeds=source.model.embed_tokens(prompt), use_cache=True)
    for end in range(TINY_WINDOW - 2, ids.shape[1] + 1):
        token = ids[:, end - 1 : end]
        out = model(token, use_cache=True, **{CACHE_KEYWORD: getattr(out, CACHE_KEYWORD)})
        if end <= TINY_WINDOW:
            stock = source(token, use_cache=True, **{CACHE_KEYWORD: getattr(stock, CACHE_KEYWORD)})
            assert torch.equal(out.logits, stock.logits), end
        else:
            assert relative_error(out.logits[:, -1], model(ids[:, :end]).logits[:, -1]) <= 1e-5, end


@pytest.fixture(scope="module")
def tiny_converted_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny model converted to 4x its window with a ramp of long factors and n_hat 4."""
    output = tmp_path_factory.mktemp("converted") / "tiny-longrope"
    write_checkpoint(read_source(tiny_llama_dir), tiny_factor_set(tiny_llama_dir, n_hat=4), output, "test")
    return output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_loads_keep_float32_rotary_math(tiny_llama_dir, tiny_converted_dir, dtype):
    """from_pretrained(dtype=bf16/fp16): frequencies and angles stay float32 (as stock transformers keeps its
    own); inside the window the logits are the source's loaded in the same dtype, bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True, dtype=dtype).eval()
    source = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True).model.rotary_emb
    rotary = model.model.rotary_emb
    assert {buffer.dtype for buffer in rotary.buffers()} == {torch.float32}
    positions = torch.arange(4 * TINY_WINDOW)[None]  # long set beyond the window, n_hat at the start
    for cos_sin, expected in zip(rotary(torch.zeros(1, dtype=dtype), positions), reference(torch.zeros(1), positions)):
        assert torch.equal(cos_sin, expected.to(dtype))
    ids, mask = left_padded(2, TINY_WINDOW, padding=9, seed=7)
    assert torch.equal(model(ids, attention_mask=mask).logits, source(ids, attention_mask=mask).logits)
    model.float(), source.float()  # then float32: the source's rounded weights in float32, its float32 inv_freq
    assert torch.equal(model(ids, attention_mask=mask).logits, source(ids, attention_mask=mask).logits)


# A cast of the model loaded in float32, and the dtype the source is loaded in to compare with (then cast to the
# model's dtype with .float(), which leaves stock's float32 inv_freq alone).
CASTS = {
    "to(bfloat16)": (lambda model: model.to(torch.bfloat16), torch.bfloat16),
    "bfloat16()": (lambda model: model.bfloat16(), torch.bfloat16),
    "half()": (lambda model: model.half(), torch.float16),
    "to(cpu, float16)": (lambda model: model.to("cpu", torch.float16), torch.float16),
    "to(bfloat16).float()": (lambda model: model.to(torch.bfloat16).float(), torch.bfloat16),
}


@pytest.mark.parametrize("cast", CASTS)
@torch.no_grad()
def test_casts_of_the_loaded_model_keep_float32_rotary_math(tiny_llama_dir, tiny_converted_dir, cast):
    """Load in float32, swap factors in as the search does, then cast: the frequencies stay the float32 ones, so the
    angles at 16k are the float32 formula's, and inside the window the logits are the source's loaded in that
    dtype (whose inv_freq stays float32), bit for bit."""
    cast_model, source_dtype = CASTS[cast]
    model = AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True).eval()
    long_factor = [1.5 * factor for factor in RAMP]
    model.model.rotary_emb.set_factors(long_factor=long_factor, n_hat=6, long_mscale=1.25)
    cast_model(model)
    source = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=source_dtype).eval()
    if model.dtype != source_dtype:
        source.float()
    rotary = model.model.rotary_emb
    assert {buffer.dtype for buffer in rotary.buffers()} == {torch.float32}

    positions = torch.arange(16384)[None]
    angles = torch.where(positions[..., None] < 6, positions[..., None].float() * rope_inv_freq(10000.0, 16),
                         positions[..., None].float() * rope_inv_freq(10000.0, 16, long_factor))
    angles = torch.cat((angles, angles), -1)
    mscale = torch.tensor(1.25)
    cos, sin = rotary(torch.zeros(1, dtype=model.dtype), positions)
    assert torch.equal(cos, (angles.cos() * mscale).to(model.dtype))
    assert torch.equal(sin, (angles.sin() * mscale).to(model.dtype))

    ids, mask = left_padded(2, TINY_WINDOW, padding=9, seed=7)
    assert torch.equal(model(ids, attention_mask=mask).logits, source(ids, attention_mask=mask).logits)


def test_stock_llama_rounds_its_frequencies_when_cast(tiny_llama_dir):
    """What README compares with: stock transformers keeps inv_freq float32 in a bf16 load, not in a cast."""
    assert LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).model.rotary_emb.inv_freq.dtype == (
        torch.float32)
    assert LlamaForCausalLM.from_pretrained(tiny_llama_dir).to(torch.bfloat16).model.rotary_emb.inv_freq.dtype == (
        torch.bfloat16)


def test_moving_to_the_meta_device_keeps_float32_frequencies(tiny_converted_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_converted_dir, trust_remote_code=True)
    model.to("meta", torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert {(buffer.device.type, buffer.dtype) for buffer in model.model.rotary_emb.buffers()} == {
        ("meta", torch.float32)}


def test_search_and_evaluation_loader_keeps_float32_angles_in_bf16(tiny_llama_dir):
    """load_longrope_model loads bf16 on CUDA; the same load on CPU keeps the rotary math in float32."""
    config = longrope_config(json.loads((tiny_llama_dir / "config.json").read_text()), tiny_factor_set(tiny_llama_dir))
    model = load_longrope_model(tiny_llama_dir, config, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert {buffer.dtype for buffer in model.model.rotary_emb.buffers()} == {torch.float32}
    positions = torch.arange(4 * TINY_WINDOW)[None]
    cos, _ = model.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), positions)
    expected, _ = LongRoPEScaledRotaryEmbedding(LlamaConfig.from_dict(config))(torch.zeros(1), positions)
    assert torch.equal(cos, expected.to(torch.bfloat16))


@torch.no_grad()
def test_unsupported_cache_layout_is_a_clear_error(tiny_llama_dir):
    _, model, config = longrope_pair(tiny_llama_dir)
    cache = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=1000) for _ in range(config.num_hidden_layers)])
    ids = torch.randint(3, 256, (1, TINY_WINDOW + 1))
    model(ids[:, :-1], cache=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="DynamicCache and StaticCache"):
        model(ids[:, -1:], cache=cache, use_cache=True)
