"""Every reader of a converted checkpoint without remote code sees the same model: stock transformers 5.x
(this release), 4.57 and 4.45 (installed into the test cache, run in subprocesses), and vLLM (its reading
rules encoded below from its source). They apply the same factors and attention scale; what each lacks is
in README's table. A default conversion loads without a warning, with and without the shipped code."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from conftest import TINY_WINDOW
from conftest import edit_json
from longrope_convert.card import updated_card
from longrope_convert.convert import plan_conversion, write_checkpoint, write_planned
from longrope_convert.factors import analytic_factor_set
from longrope_convert.modeling_longrope_llama import default_long_mscale, rope_inv_freq
from longrope_convert.source import read_source
from longrope_models import HALF, tiny_factor_set
from reader_probe import read_checkpoint
from transformers_releases import run_python

TARGET = 4 * TINY_WINDOW
TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"  # trained; shipped searched factors at 2048
TESTBED_WINDOW = 256
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


def assert_warnings(logged: list[str], factor_set, key_style: str = "parameters") -> None:
    """None for a default attention scale; else one line: transformers does not use the two keys for vLLM."""
    window, target = factor_set.model.original_max_position_embeddings, factor_set.target_length
    if factor_set.long_mscale == default_long_mscale(target / window, window):
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
    assert_warnings(reading["warnings"], factor_set)
    assert_warnings(reading["remote_code_warnings"], factor_set)


@pytest.mark.parametrize("target, method", [(2048, "search"), (4096, "init:llama3")])
def test_a_default_conversion_loads_without_a_warning(target, method, tmp_path):
    """`longrope-convert SOURCE --target N` with nothing else: the shipped searched factors of the testbed at 2048
    load silently, stock and with the shipped code; the llama3 init (no shipped factors at 4096) keeps the one line
    about vLLM's two keys (README, Load: the choice made)."""
    plan = plan_conversion(str(TESTBED), target=target, output=tmp_path / "out")
    write_planned(plan)
    assert plan.factor_set.method == method
    reading = read_checkpoint(str(tmp_path / "out"), TESTBED_WINDOW)
    assert reading["remote_code"] == "loaded"
    assert_warnings(reading["warnings"], plan.factor_set)
    assert_warnings(reading["remote_code_warnings"], plan.factor_set)
    assert ("the two keys are for vLLM" in (tmp_path / "out" / "README.md").read_text()) == (method == "init:llama3")


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


# Lines of vLLM 0.34.0 (the wheel's sources; it pins transformers >= 5.16.1, < 5.23, so the suite reads configs for
# it under 5.17 too, in test_transformers_releases.py).
VLLM_WINDOW_KEYS = ["max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                    "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len"]


def vllm_max_model_len(config, max_model_len: int | None = None) -> int:
    """The max_model_len vLLM serves a `longrope` Llama config with (`--max-model-len`, or None), encoded from
    vLLM 0.34.0:

    - vllm/transformers_utils/model_arch_config_convertor.py:375-408, derive_max_model_len_and_key: the smallest
      of VLLM_WINDOW_KEYS the config has; model_max_length instead when it has that key;
    - vllm/config/model.py:2643-2678, _get_and_verify_max_len: no `factor` applied for `longrope`;
    - vllm/config/model.py:2686-2697: without --max-model-len, for `longrope` the config's top-level
      original_max_position_embeddings when it has one (vLLM PR #27431), else the derived length;
    - vllm/config/model.py:2701-2727: a --max-model-len above the derived length is refused (ValueError) unless
      model_max_length allows it (or VLLM_ALLOW_LONG_MAX_MODEL_LEN=1).
    """
    present = {key: getattr(config, key) for key in VLLM_WINDOW_KEYS if getattr(config, key, None) is not None}
    derived = min(present.values())
    if getattr(config, "model_max_length", None):
        derived = config.model_max_length
    if max_model_len is None:
        return int(getattr(config, "original_max_position_embeddings", derived))
    if max_model_len > derived and (getattr(config, "model_max_length", None) is None
                                    or max_model_len > config.model_max_length):
        raise ValueError(f"User-specified max_model_len ({max_model_len}) is greater than the derived max_model_len")
    return max_model_len


def vllm_longrope(rope_parameters: dict, max_position_embeddings: int, max_model_len: int) -> dict:
    """The factor set and attention scale vLLM serves for a `longrope` config, encoded from vLLM 0.34.0:

    - vllm/model_executor/models/llama.py:243-246 and 266, LlamaAttention: get_rope(max_position=
      config.max_position_embeddings, rope_parameters=config.rope_parameters), the parameters as transformers 5
      standardises them (vllm/transformers_utils/config.py:701-720, patch_rope_parameters);
    - vllm/model_executor/layers/rotary_embedding/__init__.py:313-333, get_rope, `scaling_type == "longrope"`:
      short_factor, long_factor, original_max_position_embeddings, and short_mscale / long_mscale only when present;
    - vllm/model_executor/layers/rotary_embedding/phi3_long_rope_scaled_rope.py:51-80: the long set for every
      request when max_model_len > original_max_position_embeddings (the short set otherwise), and a missing
      mscale is sqrt(1 + ln s / ln L), s = max_position / L, 1.0 when s <= 1.
    """
    original = rope_parameters["original_max_position_embeddings"]
    scale = max_position_embeddings / original
    default = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
    use_long = max_model_len > original
    return {"factors": rope_parameters["long_factor" if use_long else "short_factor"],
            "attention_scale": rope_parameters.get("long_mscale" if use_long else "short_mscale", default)}


def vllm_serves(folder, max_model_len: int | None = None) -> dict:
    """`vllm serve FOLDER [--max-model-len N]`: the window served, the factor set and the attention scale."""
    config = AutoConfig.from_pretrained(folder)
    served = vllm_max_model_len(config, max_model_len)
    return {"max_model_len": served,
            **vllm_longrope(config.rope_parameters, config.max_position_embeddings, served)}


@pytest.mark.parametrize("name", ["searched", "yarn", "pi"])
def test_vllm_reads_the_attention_scale_transformers_applies(checkpoints, name):
    """`vllm serve` gives the original window and the short set, `--max-model-len TARGET` the target and the long
    set (for every request); both with the attention factor transformers applies."""
    folder, factor_set = checkpoints[name]
    assert vllm_serves(folder) == {"max_model_len": TINY_WINDOW, "factors": factor_set.short_factor,
                                   "attention_scale": factor_set.long_mscale}
    assert vllm_serves(folder, TARGET) == {"max_model_len": TARGET, "factors": factor_set.long_factor,
                                           "attention_scale": factor_set.long_mscale}
    with pytest.raises(ValueError, match="greater than the derived max_model_len"):
        vllm_serves(folder, TARGET + 1)
    # without the two keys vLLM would apply its default instead: different for the YaRN and PI inits
    config = AutoConfig.from_pretrained(folder)
    without_keys = {k: v for k, v in config.rope_parameters.items() if k not in ("short_mscale", "long_mscale")}
    default = vllm_longrope(without_keys, config.max_position_embeddings, TARGET)["attention_scale"]
    assert (default == factor_set.long_mscale) == (name == "searched")


def test_a_source_with_extra_window_keys_converts_to_a_config_vllm_serves_at_the_target(tiny_source, tmp_path):
    """Every key vLLM takes as the window and that states the source's window is raised, so vLLM accepts
    `--max-model-len TARGET` (the source itself it refuses beyond its window); a key that states something else is
    kept, and the model card names it with what vLLM then serves."""
    extra_keys = {key: TINY_WINDOW for key in VLLM_WINDOW_KEYS[1:]}
    edit_json(tiny_source / "config.json", **extra_keys)
    with pytest.raises(ValueError):
        vllm_serves(tiny_source, TINY_WINDOW + 1)
    plan = plan_conversion(str(tiny_source), target=TARGET, factors="yarn", output=tmp_path / "out")
    write_planned(plan)
    assert vllm_serves(tmp_path / "out", TARGET)["factors"] == plan.factor_set.long_factor
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {key: config[key] for key in extra_keys} == {key: TARGET for key in extra_keys}
    assert {(c["field"], c["to"]) for c in plan.changes if c["file"] == "config.json"} == \
        {(key, TARGET) for key in ["max_position_embeddings", *extra_keys]}
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"--max-model-len {TARGET}` serves the whole window" in card and "shorter window" not in card
    assert "the two keys are for vLLM" in card  # the llama3 init: the one line loading logs, explained

    # not the window: kept, and named (model_max_length, when a config has it, is the one vLLM reads)
    edit_json(tiny_source / "config.json", seq_length=TINY_WINDOW // 2, model_max_length=None)
    plan = plan_conversion(str(tiny_source), target=TARGET, factors="yarn", output=tmp_path / "kept")
    write_planned(plan)
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["seq_length"] == TINY_WINDOW // 2
    with pytest.raises(ValueError):
        vllm_serves(tmp_path / "kept", TARGET)
    card = (tmp_path / "kept" / "README.md").read_text()
    assert f"a shorter window under `seq_length` ({TINY_WINDOW // 2})" in card
    assert updated_card(tmp_path / "kept") == card  # a refreshed card reads it from config.json again
