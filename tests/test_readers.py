"""Every reader of a converted checkpoint without remote code sees the same model: stock transformers 5.x
(this release), 4.57 and 4.45 (installed into the test cache, run in subprocesses), and vLLM (its reading
rule encoded below from its source). They apply the same factors and attention scale; what each lacks is
in README's table."""

import json
import math

import pytest
import torch
from transformers import AutoConfig

from conftest import TINY_WINDOW
from longrope_convert.convert import write_checkpoint
from longrope_convert.factors import analytic_factor_set
from longrope_convert.modeling_longrope_llama import default_long_mscale, rope_inv_freq
from longrope_convert.source import read_source
from longrope_models import HALF, tiny_factor_set
from reader_probe import read_checkpoint
from transformers_releases import run_python

TARGET = 4 * TINY_WINDOW
UNUSED_MSCALE_KEYS = "Unrecognized keys in `rope_{}` for 'rope_type'='longrope': {{'{}', '{}'}}"


@pytest.fixture(scope="module")
def checkpoints(tiny_llama_dir, tmp_path_factory):
    """Converted tiny checkpoints: a searched-style set (default long mscale, as every searched set has) and
    the YaRN and PI inits, whose attention scales (0.1 ln s + 1 and 1) are not vLLM's default."""
    source = read_source(tiny_llama_dir)
    sets = {"searched": tiny_factor_set(tiny_llama_dir, n_hat=4),
            "yarn": analytic_factor_set("yarn", source.fingerprint, TARGET),
            "pi": analytic_factor_set("pi", source.fingerprint, TARGET)}
    root = tmp_path_factory.mktemp("readers")
    for name, factor_set in sets.items():
        write_checkpoint(source, factor_set, root / name, factor_set.method)
    return {name: (root / name, factor_set) for name, factor_set in sets.items()}


def expected_reading(factor_set, always_long: bool = False) -> dict:
    """Short rows: the short factors (the long ones where a release has no switch); long rows: the long
    factors; both with attention_factor, the long mscale."""
    short = rope_inv_freq(10000.0, 2 * HALF, factor_set.long_factor if always_long else factor_set.short_factor)
    return {"short": short, "long": rope_inv_freq(10000.0, 2 * HALF, factor_set.long_factor),
            "attention_scale": factor_set.long_mscale}


def assert_reads(reading: dict, expected: dict) -> None:
    for length in ("short", "long"):
        torch.testing.assert_close(torch.tensor(reading[length]["inv_freq"]), expected[length], rtol=1e-5, atol=0)
        assert reading[length]["attention_scale"] == pytest.approx(expected["attention_scale"], rel=1e-6)


def assert_warnings(logged: list[str], factor_set, key_style: str) -> None:
    """None for a default attention scale; else one line: transformers does not use the two keys for vLLM."""
    if factor_set.long_mscale == default_long_mscale(TARGET / TINY_WINDOW, TINY_WINDOW):
        assert logged == []
    else:  # the keys are printed as a set, in either order
        assert len(logged) == 1 and logged[0] in {UNUSED_MSCALE_KEYS.format(key_style, "short_mscale", "long_mscale"),
                                                  UNUSED_MSCALE_KEYS.format(key_style, "long_mscale", "short_mscale")}


@pytest.mark.parametrize("name", ["searched", "yarn", "pi"])
def test_stock_transformers_5_reads_the_factors_and_attention_scale(checkpoints, name):
    folder, factor_set = checkpoints[name]
    reading = read_checkpoint(str(folder), TINY_WINDOW)
    assert reading["class"] == "LlamaForCausalLM" and reading["remote_code"] == "loaded"
    assert_reads(reading, expected_reading(factor_set))
    assert_warnings(reading["warnings"], factor_set, "parameters")


@pytest.mark.parametrize("version", ["4.45.2", "4.57.6"])
def test_transformers_4_reads_the_same_and_refuses_the_remote_code_in_one_line(checkpoints, version):
    """4.57 switches sets at the window like 5.x (from the top-level original_max_position_embeddings); 4.45 has
    no switch and uses the long factors at every length. The shipped code names the minimum release."""
    for name in ("searched", "yarn"):
        folder, factor_set = checkpoints[name]
        run = run_python(version, "tests/reader_probe.py", str(folder), str(TINY_WINDOW), timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        reading = json.loads(run.stdout.splitlines()[-1])
        assert reading["version"] == version and reading["class"] == "LlamaForCausalLM"
        assert_reads(reading, expected_reading(factor_set, always_long=version == "4.45.2"))
        assert_warnings(reading["warnings"], factor_set, "scaling")
        assert reading["remote_code"] == (
            f"This LongRoPE checkpoint's modeling code needs transformers >= 5.3 (found {version}): "
            "pip install -U 'transformers>=5.3,<6'")


def vllm_longrope(rope_parameters: dict, max_position_embeddings: int, max_model_len: int) -> dict:
    """The factor set and attention scale vLLM serves for a `longrope` config, encoded from vllm-project/vllm:

    - vllm/model_executor/models/llama.py, LlamaDecoderLayer.__init__ and LlamaAttention._init_rotary_emb:
      get_rope(max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters), the
      parameters as transformers 5 standardises them (vllm/transformers_utils/config.py, patch_rope_parameters;
      under transformers 4 it copies rope_scaling and the top-level original_max_position_embeddings);
    - vllm/model_executor/layers/rotary_embedding/__init__.py (07b12f1b), get_rope, branch
      `scaling_type == "longrope"`: short_factor, long_factor, original_max_position_embeddings, and
      short_mscale / long_mscale only when present;
    - vllm/model_executor/layers/rotary_embedding/phi3_long_rope_scaled_rope.py (17d618b0), lines 48-64: the long
      set for every request when max_model_len > original_max_position_embeddings (the short set otherwise), and
      a missing mscale is sqrt(1 + ln s / ln L), s = max_position / L, 1.0 when s <= 1.
    """
    original = rope_parameters["original_max_position_embeddings"]
    scale = max_position_embeddings / original
    default = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
    use_long = max_model_len > original
    return {"factors": rope_parameters["long_factor" if use_long else "short_factor"],
            "attention_scale": rope_parameters.get("long_mscale" if use_long else "short_mscale", default)}


@pytest.mark.parametrize("name", ["searched", "yarn", "pi"])
def test_vllm_reads_the_attention_scale_transformers_applies(checkpoints, name):
    folder, factor_set = checkpoints[name]
    config = AutoConfig.from_pretrained(folder)
    for max_model_len, factors in ((TARGET, factor_set.long_factor), (TINY_WINDOW, factor_set.short_factor)):
        served = vllm_longrope(config.rope_parameters, config.max_position_embeddings, max_model_len)
        assert served == {"factors": factors, "attention_scale": factor_set.long_mscale}
    # without the two keys vLLM would apply its default instead: different for the YaRN and PI inits
    without_keys = {k: v for k, v in config.rope_parameters.items() if k not in ("short_mscale", "long_mscale")}
    default = vllm_longrope(without_keys, config.max_position_embeddings, TARGET)["attention_scale"]
    assert (default == factor_set.long_mscale) == (name == "searched")
