"""Factor files (format and strict validation) and the analytic factor sets."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longrope_convert.factors import (
    ANALYTIC_METHODS,
    N_HAT_MSCALE,
    FactorFileError,
    ModelFingerprint,
    analytic_factor_set,
    analytic_factors,
    compose,
    factor_set_from_json,
    find_shipped_factor_set,
    load_factor_set,
    source_factor_set,
)
from longrope_convert.modeling_longrope_llama import rope_inv_freq
from longrope_convert.source_rope import critical_dimension

LLAMA3_8B = ModelFingerprint(architecture="LlamaForCausalLM", name="Meta-Llama-3-8B", head_dim=128,
                             rope_theta=500000.0, original_max_position_embeddings=8192, num_hidden_layers=32,
                             hidden_size=4096)


def test_pi_and_ntk_sets():
    pi = analytic_factor_set("pi", LLAMA3_8B, 65536)
    assert pi.long_factor == [8.0] * 64 and pi.short_factor == [1.0] * 64 and pi.long_mscale == 1.0
    ntk = analytic_factor_set("ntk", LLAMA3_8B, 65536)
    # NTK-aware = the same RoPE with base b * s^(d / (d - 2))
    new_base = 500000.0 * 8 ** (128 / 126)
    torch.testing.assert_close(rope_inv_freq(500000.0, 128, ntk.long_factor), rope_inv_freq(new_base, 128),
                               rtol=2e-6, atol=0)
    assert ntk.long_factor[0] == 1.0 and math.isclose(ntk.long_factor[-1], 8.0)


def test_llama3_set_equals_transformers_llama3_rope():
    factor_set = analytic_factor_set("llama3", LLAMA3_8B, 65536)
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=65536,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    torch.testing.assert_close(rope_inv_freq(500000.0, 128, factor_set.long_factor), expected, rtol=1e-5, atol=0)


def test_yarn_set_ramps_from_extrapolation_to_interpolation():
    factor_set = analytic_factor_set("yarn", LLAMA3_8B, 65536)
    factors = factor_set.long_factor
    # beta_fast 32 / beta_slow 1 at base 5e5, window 8192: dims below 19 keep their frequency, above 39 get s
    low = math.floor(128 * math.log(8192 / (32 * 2 * math.pi)) / (2 * math.log(500000.0)))
    high = math.ceil(128 * math.log(8192 / (1 * 2 * math.pi)) / (2 * math.log(500000.0)))
    assert (low, high) == (18, 35)
    assert factors[: low + 1] == [1.0] * (low + 1) and factors[high:] == [8.0] * (64 - high)
    assert all(a < b for a, b in zip(factors[low:high], factors[low + 1 : high + 1]))
    assert math.isclose(factors[low + 5], 1.0 + 7.0 * 5 / (high - low))
    assert math.isclose(factor_set.long_mscale, 0.1 * math.log(8) + 1)


def test_the_critical_dimension_is_longrope2_s():
    """ceil(d/2 log_theta(L / 2 pi)) - 1, as LongRoPE2's released search computes it: the last dimension whose period
    is shorter than the window. Llama-3-8B's config (head_dim 128, rope_theta 500000, window 8192): 34 of 64;
    SmolLM2-135M's (64, 100000, 8192): 19 of 32; the testbeds' (64, 10000, 256): 12, and (128, 900, 256): 34."""
    assert critical_dimension(128, 500000.0, 8192) == 34
    assert critical_dimension(64, 100000.0, 8192) == 19
    assert critical_dimension(64, 10000.0, 256) == 12 and critical_dimension(128, 900.0, 256) == 34
    for head_dim, theta, window in ((128, 500000.0, 8192), (64, 100000.0, 8192), (64, 10000.0, 256)):
        c = critical_dimension(head_dim, theta, window)
        period = [2 * math.pi * theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
        assert period[c] < window <= period[c + 1]
    assert critical_dimension(64, 10000.0, 4) == 0 and critical_dimension(64, 2.0, 10**9) == 31  # clamped


def test_ntk_and_yarn_moved_to_the_critical_dimension():
    """ntk-cd: s^(i/34) below Llama-3-8B's critical dimension 34, s from it on (NTK reaches s at the last); yarn-cd:
    YaRN's ramp with its upper end at 34 instead of 35, its attention scale kept."""
    ntk = analytic_factor_set("ntk-cd", LLAMA3_8B, 65536).long_factor
    assert ntk == pytest.approx([8 ** (i / 34) for i in range(34)] + [8.0] * 30, rel=1e-12)
    yarn, moved = (analytic_factor_set(m, LLAMA3_8B, 65536) for m in ("yarn", "yarn-cd"))
    assert yarn.long_factor[34] < 8.0 and moved.long_factor[34:] == [8.0] * 30
    assert moved.long_factor[:19] == [1.0] * 19 and math.isclose(moved.long_factor[20], 1 + 7 * 2 / 16)
    assert moved.long_mscale == yarn.long_mscale and moved.method == "init:yarn-cd"


def test_analytic_sets_are_valid_files(tmp_path):
    for method in ANALYTIC_METHODS:
        factor_set = analytic_factor_set(method, LLAMA3_8B, 65536)
        factor_set.save(tmp_path / f"{method}.json")
        loaded = load_factor_set(tmp_path / f"{method}.json")
        assert loaded == factor_set
        assert loaded.method == f"init:{method}" and not loaded.is_searched


def valid_file_data() -> dict:
    return analytic_factor_set("yarn", LLAMA3_8B, 65536).to_json()


def mutate(data: dict, path: str, value):
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


DELETE = object()
BAD_FILES = [
    ("long_factor", list(range(1, 64)), "long_factor", "head_dim/2 = 64"),
    ("short_factor", [1.0] * 65, "short_factor", "head_dim/2 = 64"),
    ("long_factor.10", float("inf"), "long_factor[10]", "finite"),
    ("long_factor.3", float("nan"), "long_factor[3]", "finite"),
    ("short_factor.0", 0.5, "short_factor[0]", ">= 1"),
    ("long_factor.40", 2.0, "long_factor[40]", "non-decreasing"),
    ("surprise", 1, "surprise", "unknown field"),
    ("model.rope_scale", 1, "model.rope_scale", "unknown field"),
    ("model.rope_scaling", 1, "model.rope_scaling", "wrong type"),
    ("short_set", "mine", "short_set", "'source' or 'factors'"),
    ("version", 4, "version", "this tool reads 1, 2, 3"),
    ("n_hat_mscale", "long", "n_hat_mscale", "'row' or 'short'"),
    ("n_hat_mscale", DELETE, "n_hat_mscale", "missing"),
    ("provenance.mood", "happy", "provenance.mood", "unknown field"),
    ("n_hat", DELETE, "n_hat", "missing"),
    ("n_hat", -1, "n_hat", "non-negative"),
    ("long_mscale", 0, "long_mscale", "positive"),
    ("target_length", 4096, "target_length", "must exceed"),
    ("format", "yarn", "format", "longrope-factors"),
    ("model.head_dim", "128", "model.head_dim", "wrong type"),
    ("provenance.method", "", "provenance.method", "non-empty"),
]


@pytest.mark.parametrize("path,value,field,problem", BAD_FILES)
def test_bad_factor_files_name_the_file_and_the_field(tmp_path, path, value, field, problem):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(mutate(valid_file_data(), path, value)))
    with pytest.raises(FactorFileError) as caught:
        load_factor_set(bad)
    message = str(caught.value)
    assert str(bad) in message and f"'{field}'" in message and problem in message
    assert "\n" not in message


def test_unreadable_factor_files(tmp_path):
    with pytest.raises(FactorFileError, match="no such factor file"):
        load_factor_set(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(FactorFileError, match="broken.json: not a readable JSON file"):
        load_factor_set(tmp_path / "broken.json")
    (tmp_path / "a-model").mkdir()  # a folder gives its longrope_factors.json, as a converted checkpoint has
    with pytest.raises(FactorFileError, match="'.*a-model' is a folder without longrope_factors.json"):
        load_factor_set(tmp_path / "a-model")


def test_shipped_lookup_matches_fingerprint_and_target(tmp_path):
    (tmp_path / "llama3").mkdir()
    analytic_factor_set("ntk", LLAMA3_8B, 65536).save(tmp_path / "llama3" / "65536.json")
    found, origin = find_shipped_factor_set(LLAMA3_8B, 65536, tmp_path)
    assert origin == "shipped:llama3/65536.json" and found.method == "init:ntk"
    assert find_shipped_factor_set(LLAMA3_8B, 32768, tmp_path) is None
    renamed = ModelFingerprint(**{**LLAMA3_8B.__dict__, "name": "a fine-tune of it"})
    assert find_shipped_factor_set(renamed, 65536, tmp_path) is not None
    other_theta = ModelFingerprint(**{**LLAMA3_8B.__dict__, "rope_theta": 10000.0})
    assert find_shipped_factor_set(other_theta, 65536, tmp_path) is None


LLAMA3_1 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
LLAMA3_1_8B = replace(LLAMA3_8B, name="Llama-3.1-8B", original_max_position_embeddings=131072, rope_scaling=LLAMA3_1)


def test_a_set_made_for_a_rope_scaled_source_matches_only_that_scaling(tmp_path):
    (tmp_path / "llama3").mkdir()
    analytic_factor_set("ntk", LLAMA3_1_8B, 524288).save(tmp_path / "llama3" / "524288.json")
    assert find_shipped_factor_set(LLAMA3_1_8B, 524288, tmp_path) is not None
    unscaled = replace(LLAMA3_1_8B, rope_scaling={"rope_type": "default"})
    other_factor = replace(LLAMA3_1_8B, rope_scaling={**LLAMA3_1, "factor": 16.0})
    assert find_shipped_factor_set(unscaled, 524288, tmp_path) is None
    assert find_shipped_factor_set(other_factor, 524288, tmp_path) is None


def test_version_1_files_are_read_as_made_for_an_unscaled_source():
    shipped = Path(__file__).parent.parent / "factors" / "SmolLM2-135M-Instruct" / "16384.json"
    assert json.loads(shipped.read_text())["version"] == 1
    factor_set = load_factor_set(shipped)
    assert factor_set.model.rope_scaling == {"rope_type": "default"} and factor_set.short_set == "factors"
    assert factor_set.to_json()["version"] == 3 and factor_set_from_json(factor_set.to_json()) == factor_set


def test_files_before_version_3_keep_the_scale_below_n_hat_they_were_made_with():
    """Without n_hat_mscale a file means "row" (the long mscale below n_hat in long rows, as the shipped modeling
    file applied it before the key existed); the sets this version makes record N_HAT_MSCALE."""
    old = {key: value for key, value in valid_file_data().items() if key != "n_hat_mscale"}
    assert factor_set_from_json({**old, "version": 2, "n_hat": 16}).n_hat_mscale == "row"
    new = analytic_factor_set("yarn", LLAMA3_8B, 65536)
    assert new.n_hat_mscale == N_HAT_MSCALE and new.to_json()["n_hat_mscale"] == N_HAT_MSCALE
    assert factor_set_from_json({**new.to_json(), "n_hat_mscale": "row"}).n_hat_mscale == "row"


def test_analytic_sets_compose_on_the_source_scaling():
    """Llama 3.1 to 512k: each method's lambda for the 4x beyond 131,072 times Llama 3.1's own factors; its short
    set, n_hat and attention factor kept."""
    base = LLAMA3_1_8B.base_factor_set()
    for method in ("pi", "ntk", "yarn", "llama3"):
        composed = analytic_factor_set(method, LLAMA3_1_8B, 524288)
        relative, mscale = analytic_factors(method, 4.0, 128, 500000.0, 131072)
        assert composed.long_factor == [b * f for b, f in zip(base.long_factor, relative)]
        assert composed.long_factor == sorted(composed.long_factor)
        assert composed.short_factor == base.short_factor and composed.short_set == "source" and composed.n_hat == 0
        assert composed.long_mscale == mscale and composed.keeps_source_inside_window
        assert composed.provenance["composition"] == {"base": "llama3", "extends": [131072, 524288],
                                                      "attention_scale": f"source x {method}"}
    assert analytic_factors("pi", 4.0, 128, 500000.0, 131072) == ([4.0] * 64, 1.0)
    pi = analytic_factor_set("pi", LLAMA3_1_8B, 524288)
    assert pi.long_factor[:29] == [4.0] * 29 and pi.long_factor[-29:] == [32.0] * 29


def test_new_factors_must_interpolate_further_than_the_source():
    composed = analytic_factor_set("pi", LLAMA3_1_8B, 524288).to_json()
    composed["long_factor"] = [1.0] * 64  # plain RoPE: below Llama 3.1's own factors from dimension 29 on
    with pytest.raises(FactorFileError, match=r"field 'long_factor\[29\]': must be >= the source's own factor 1.207"):
        factor_set_from_json(composed)
    with pytest.raises(ValueError, match="non-decreasing numbers >= 1"):
        compose(source_factor_set(LLAMA3_1_8B, 524288), [0.5] * 64)
