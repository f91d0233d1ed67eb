"""Sources that already scale RoPE (linear, llama3, yarn): inside the source's window a converted checkpoint
is the source bit for bit; beyond it the long set; n_hat keeps the source's angles; the cache switch holds.

These tests also run under the oldest supported transformers release and one in the middle
(test_transformers_releases.py).
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from conftest import TINY_WINDOW, tiny_llama_config
from longrope_convert.modeling_longrope_llama import (
    LongRoPELlamaForCausalLM,
    default_long_mscale,
    rope_inv_freq,
    source_inv_freq,
)
from longrope_models import HALF, RAMP, left_padded, relative_error
from test_modeling import greedy_logits_vs_recompute

TARGET = 4 * TINY_WINDOW
SOURCE_ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


def composed_config(source: LlamaForCausalLM, source_rope: dict, n_hat: int = 0) -> LlamaConfig:
    """What the converter writes for a scaled source: LongRoPE over the source's window, the source's RoPE
    as the short set, its attention factor as the short mscale."""
    return tiny_llama_config(
        max_position_embeddings=TARGET,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": RAMP,
                         "short_factor": [1.0] * HALF, "original_max_position_embeddings": TINY_WINDOW,
                         "factor": TARGET / TINY_WINDOW,
                         "attention_factor": default_long_mscale(TARGET / TINY_WINDOW, TINY_WINDOW)},
        longrope={"n_hat": n_hat, "source_rope": source_rope, "short_set": "source",
                  "short_mscale": source.model.rotary_emb.attention_scaling},
    )


@pytest.fixture(scope="module", params=list(SOURCE_ROPES))
def scaled_source(request, tmp_path_factory):
    """(folder of a tiny source with this RoPE scaling, its rope parameters without rope_theta)."""
    source_rope = SOURCE_ROPES[request.param]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param) / "source"
    LlamaForCausalLM(tiny_llama_config(rope_parameters={**source_rope, "rope_theta": 10000.0})).save_pretrained(folder)
    return folder, source_rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_inside_the_window_the_converted_checkpoint_is_the_scaled_source(scaled_source, dtype):
    folder, source_rope = scaled_source
    source = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    model = LongRoPELlamaForCausalLM.from_pretrained(
        folder, config=composed_config(source, source_rope, n_hat=4), dtype=dtype).eval()
    assert torch.equal(model.model.rotary_emb.short_inv_freq, source.model.rotary_emb.inv_freq.float())
    for length in (1, 17, TINY_WINDOW):
        ids = torch.randint(3, 256, (2, length))
        assert torch.equal(model(ids).logits, source(ids).logits), length
    ids, mask = left_padded(2, TINY_WINDOW, padding=11, seed=8)
    assert torch.equal(model(ids, attention_mask=mask).logits, source(ids, attention_mask=mask).logits)


@torch.no_grad()
def test_beyond_the_window_the_long_set_with_the_source_angles_before_n_hat(scaled_source):
    folder, source_rope = scaled_source
    source = LlamaForCausalLM.from_pretrained(folder).eval()
    config = composed_config(source, source_rope, n_hat=8)
    rotary = LongRoPELlamaForCausalLM(config).model.rotary_emb
    positions = torch.arange(TINY_WINDOW + 36)[None]
    cos, sin = rotary(torch.zeros(1), positions)
    source_angles = positions[..., None].float() * source.model.rotary_emb.inv_freq
    long_angles = positions[..., None].float() * rope_inv_freq(10000.0, 2 * HALF, RAMP)
    expected = torch.where(positions[..., None] < 8, source_angles, long_angles)
    expected = torch.cat((expected, expected), -1)
    mscale = config.rope_parameters["attention_factor"]
    torch.testing.assert_close(cos, expected.cos() * mscale, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, expected.sin() * mscale, rtol=0, atol=1e-6)
    assert not torch.allclose(source_angles[0, 8:], long_angles[0, 8:])


@torch.no_grad()
def test_cached_generation_across_the_window_of_a_scaled_source(scaled_source):
    folder, source_rope = scaled_source
    source = LlamaForCausalLM.from_pretrained(folder).eval()
    model = LongRoPELlamaForCausalLM.from_pretrained(folder, config=composed_config(source, source_rope, n_hat=4)).eval()
    ids, mask = left_padded(2, TINY_WINDOW - 3, padding=6, seed=9)
    assert greedy_logits_vs_recompute(model, ids, mask, 12) <= 1e-5


# Real configurations (Llama 3.1, a Qwen2.5-style YaRN) and made-up ones whose factors are not powers of two,
# so that any change in the order of float32 operations shows.
REGISTRY_CASES = [
    (128, 500000.0, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
    (128, 1000000.0, 131072, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    (64, 10000.0, 8192, {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 16, "beta_slow": 2, "truncate": False}),
    (128, 10000.0, 16384, {"rope_type": "linear", "factor": 2.5}),
    (128, 500000.0, 65536, {"rope_type": "llama3", "factor": 6.0, "low_freq_factor": 1.5, "high_freq_factor": 3.0,
                            "original_max_position_embeddings": 8192}),
    (64, 100000.0, 8192, {"rope_type": "default"}),
]


@pytest.mark.parametrize("head_dim, rope_theta, window, source_rope", REGISTRY_CASES)
def test_source_frequencies_are_bit_identical_to_transformers(head_dim, rope_theta, window, source_rope):
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=window, rope_parameters={**source_rope, "rope_theta": rope_theta})
    if source_rope["rope_type"] == "default":  # computed by the rotary embedding class itself
        expected = LlamaRotaryEmbedding(config).inv_freq
    else:
        expected = ROPE_INIT_FUNCTIONS[source_rope["rope_type"]](config, None)[0]
    assert torch.equal(source_inv_freq(source_rope, rope_theta, head_dim, window), expected)


@pytest.mark.parametrize("rope_type", ["dynamic", "proportional", "nonsense"])
def test_unsupported_source_rope_types_are_one_clear_error(rope_type):
    with pytest.raises(ValueError, match=f"source's rope_type '{rope_type}' is not supported.*linear, llama3, yarn"):
        source_inv_freq({"rope_type": rope_type, "factor": 2.0}, 10000.0, 16, 64)


def test_short_factors_replace_the_source_set_when_asked(scaled_source):
    folder, source_rope = scaled_source
    source = LlamaForCausalLM.from_pretrained(folder)
    config = composed_config(source, source_rope)
    config.longrope = {**config.longrope, "short_set": "factors"}
    rotary = LongRoPELlamaForCausalLM(config).model.rotary_emb
    assert torch.equal(rotary.short_inv_freq, rope_inv_freq(10000.0, 2 * HALF, [1.0] * HALF))
    assert torch.equal(rotary.source_inv_freq, source.model.rotary_emb.inv_freq)  # still the source before n_hat
