"""Sources that already scale RoPE (Llama 3.1-style llama3, yarn, linear, a LongRoPE checkpoint), read as stock
transformers reads them and composed by the real converter and search: inside the source's window the converted
checkpoint is the source bit for bit; beyond it the long factors are the source's times new ones."""

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from conftest import DATA, TINY_WINDOW, edit_json, tiny_llama_config
from longrope_convert.card import model_card
from longrope_convert.errors import LongRoPEError, RopeScalingError
from longrope_convert.evaluate import comparison_sets
from longrope_convert.factors import (
    FactorSet,
    ModelFingerprint,
    analytic_factor_set,
    load_factor_set,
    source_factor_set,
)
from longrope_convert.perplexity import load_longrope_model, use_factor_set
from longrope_convert.search import baseline_sets, long_search_task
from longrope_convert.source import describe_config, read_source
from longrope_convert.source_rope import base_factor_set, longrope_attention_factor
from longrope_models import HALF, left_padded
from test_modeling import greedy_logits_vs_recompute

CLI = [sys.executable, "-m", "longrope_convert"]
TARGET = 4 * TINY_WINDOW
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def convert(source: Path, output: Path, target: int, *factors: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, str(source), "--target", str(target), "--output", str(output), *factors],
                          capture_output=True, text=True)
    return done


def stock_rope(config: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention factor) as stock transformers computes them for this config."""
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding(config).inv_freq, 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len)


# Llama 3.1 and 3.2 as their Hub configs have them, a Qwen2.5-style YaRN, DeepSeek-style YaRN mscales, an
# untruncated YaRN, PI, and a Phi-3-style LongRoPE: lambda_i = default inv_freq_i / that type's inv_freq_i.
BASE_CASES = {
    "Llama-3.1-8B": (128, 500000.0, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "Llama-3.2-1B": (64, 500000.0, 131072, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "yarn": (128, 1000000.0, 131072, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    "yarn mscales": (64, 10000.0, 16384, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                                          "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2}),
    "yarn untruncated": (64, 10000.0, 8192, {"rope_type": "yarn", "factor": 3.0, "attention_factor": 1.25,
                                             "original_max_position_embeddings": 4096, "truncate": False}),
    "linear": (128, 10000.0, 16384, {"rope_type": "linear", "factor": 2.5}),
    "longrope": (16, 10000.0, 256, {"rope_type": "longrope", "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0],
                                    "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
                                    "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("case", BASE_CASES)
def test_base_factors_of_every_type_equal_transformers(case):
    head_dim, rope_theta, window, rope = BASE_CASES[case]
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=window, rope_parameters={**rope, "rope_theta": rope_theta})
    base = base_factor_set(rope, rope_theta, head_dim, window)
    default = LlamaRotaryEmbedding(LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                               rope_parameters={"rope_type": "default", "rope_theta": rope_theta}))
    short, short_scale = stock_rope(config)
    long, long_scale = stock_rope(config, seq_len=window + 1)
    for factors, inv_freq in ((base.short_factor, short), (base.long_factor, long)):
        torch.testing.assert_close(torch.tensor(factors, dtype=torch.float64),
                                   (default.inv_freq / inv_freq).double(), rtol=1e-6, atol=0)
    # stock applies the attention factor to both sets (a LongRoPE source run by stock: its short set too)
    assert base.long_mscale == pytest.approx(long_scale, rel=1e-12)
    assert base.short_mscale == pytest.approx(short_scale, rel=1e-12)


def test_llama_3_1_is_a_factor_set_of_ones_a_blend_and_eights():
    head_dim, rope_theta, window, rope = BASE_CASES["Llama-3.1-8B"]
    base = base_factor_set(rope, rope_theta, head_dim, window)
    factors = base.long_factor
    blend = [f for f in factors if 1.0 < f < 8.0]
    assert factors.count(1.0) == 29 and factors.count(8.0) == 29 and len(blend) == 6
    assert round(blend[0], 2) == 1.21 and round(blend[-1], 2) == 5.26 and blend == sorted(blend)
    assert base.long_mscale == 1.0 and base.original_max_position_embeddings == 131072
    assert base.short_set == "source" and base.pretraining_window == 8192


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' (dynamic NTK) changes its frequencies with the sequence"),
    ({"rope_type": "proportional"}, "rope_type 'proportional' is not supported (supported: default, linear, llama3"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 16},
     "field 'high_freq_factor': must be a number, got None"),
])
def test_scalings_without_fixed_factors_are_refused_in_one_line(tiny_source, tmp_path, rope, message):
    edit_json(tiny_source / "config.json", rope_parameters={**rope, "rope_theta": 10000.0})
    done = convert(tiny_source, tmp_path / "out", TARGET)
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == (
        f"error: source 'tiny-llama' (rope_scaling): {base_error(rope)}") and message in done.stderr
    assert not (tmp_path / "out").exists()


def base_error(rope: dict) -> str:
    with pytest.raises(RopeScalingError) as caught:
        base_factor_set(rope, 10000.0, 16, TINY_WINDOW)
    return str(caught.value)


PHI3_LONGROPE = {"type": "longrope", "short_factor": BASE_CASES["longrope"][3]["short_factor"],
                 "long_factor": BASE_CASES["longrope"][3]["long_factor"]}
# config.json keys of each layout met on the Hub: the first four are one llama3 model to stock transformers
LAYOUTS = {
    "5.x rope_parameters": {"rope_parameters": {**LLAMA3, "rope_theta": 10000.0}},
    "4.x rope_scaling, rope_type": {"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": LLAMA3},
    "4.x rope_scaling, type": {"rope_parameters": None, "rope_theta": 10000.0,
                               "rope_scaling": {"type": "llama3", **{k: LLAMA3[k] for k in LLAMA3 if k != "rope_type"}}},
    "both (rope_scaling wins)": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                                 "rope_scaling": LLAMA3},
    "Phi-3 longrope": {"rope_parameters": None, "rope_theta": 10000.0, "max_position_embeddings": 256,
                       "original_max_position_embeddings": TINY_WINDOW, "rope_scaling": PHI3_LONGROPE},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_config_layout_is_read_as_stock_transformers_reads_it(tiny_source, layout):
    edit_json(tiny_source / "config.json", **LAYOUTS[layout])
    source = read_source(tiny_source)
    stock = LlamaForCausalLM.from_pretrained(tiny_source).model.rotary_emb
    assert source.fingerprint.original_max_position_embeddings == TINY_WINDOW  # Phi-3: its top-level 64, not 256
    if layout.startswith("Phi-3"):
        assert stock.config.rope_parameters["original_max_position_embeddings"] == TINY_WINDOW
    base = source.fingerprint.base_factor_set()
    default_inv_freq = 10000.0 ** (-torch.arange(0, 2 * HALF, 2).double() / (2 * HALF))
    for length, factors, mscale in ((TINY_WINDOW, base.short_factor, base.short_mscale),
                                    (TINY_WINDOW + 1, base.long_factor, base.long_mscale)):
        cos, sin = stock(torch.zeros(1), torch.arange(length)[None])
        inv_freq = torch.atan2(sin[0, 1, :HALF], cos[0, 1, :HALF]).double()  # the angle at position 1
        torch.testing.assert_close(torch.tensor(factors, dtype=torch.float64), default_inv_freq / inv_freq,
                                   rtol=2e-6, atol=0)
        assert math.hypot(cos[0, 1, 0], sin[0, 1, 0]) == pytest.approx(mscale, rel=1e-6)


@pytest.fixture(scope="module", params=["5.x", "4.x"])
def llama3_checkpoint(request, tmp_path_factory):
    """(a tiny Llama with llama3 scaling in this config layout, window 64; its conversion to 256 tokens)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(f"llama3-{request.param}")
    source = root / "source"
    LlamaForCausalLM(tiny_llama_config(rope_parameters={**LLAMA3, "rope_theta": 10000.0})).save_pretrained(source)
    if request.param == "4.x":  # as Llama 3.1's own config.json
        edit_json(source / "config.json", rope_parameters=None, rope_theta=10000.0, rope_scaling=LLAMA3)
    done = convert(source, root / "out", TARGET)
    assert done.returncode == 0, done.stderr
    return source, root / "out"


@torch.no_grad()
def test_a_llama3_source_converts_to_itself_inside_its_window_and_its_factors_beyond(llama3_checkpoint):
    source_folder, output = llama3_checkpoint
    source = LlamaForCausalLM.from_pretrained(source_folder).eval()
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    for length in (1, 37, TINY_WINDOW):
        ids = torch.randint(3, 256, (2, length))
        assert torch.equal(model(ids).logits, source(ids).logits), length
    ids, mask = left_padded(2, TINY_WINDOW, padding=9, seed=3)
    assert torch.equal(model(ids, attention_mask=mask).logits, source(ids, attention_mask=mask).logits)

    config = json.loads((output / "config.json").read_text())
    llama3 = base_factor_set(LLAMA3, 10000.0, 2 * HALF, TINY_WINDOW).long_factor
    long_factor = config["rope_scaling"]["long_factor"]
    assert all(new >= old for new, old in zip(long_factor, llama3)) and long_factor == sorted(long_factor)
    assert config["rope_scaling"]["short_factor"] == llama3 and config["original_max_position_embeddings"] == 64
    assert config["longrope"]["source_rope"] == LLAMA3 and config["longrope"]["short_set"] == "source"
    card = (output / "README.md").read_text()
    assert ("| source RoPE | `llama3` (factor 4.0, low_freq_factor 1.0, high_freq_factor 4.0, "
            "original_max_position_embeddings 16) |") in card and "the source model's logits bit for bit" in card
    assert torch.isfinite(model(torch.randint(3, 256, (1, TARGET))).logits).all()


@torch.no_grad()
def test_cached_generation_across_the_switch_of_a_llama3_source(llama3_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(llama3_checkpoint[1], trust_remote_code=True).eval()
    ids, mask = left_padded(2, TINY_WINDOW - 3, padding=6, seed=5)
    assert greedy_logits_vs_recompute(model, ids, mask, 12) <= 1e-5


@torch.no_grad()
def test_a_second_stage_on_a_llama3_source_still_runs_the_llama3_source_inside_its_window(llama3_checkpoint, tmp_path):
    source_folder, output = llama3_checkpoint
    done = convert(output, tmp_path / "stage2", 2 * TARGET, "--factors", "pi")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "stage2" / "config.json").read_text())
    first = json.loads((output / "config.json").read_text())
    assert config["longrope"]["source_rope"] == LLAMA3 and config["longrope"]["short_set"] == "source"
    assert config["rope_scaling"]["long_factor"] == [2 * f for f in first["rope_scaling"]["long_factor"]]
    source = LlamaForCausalLM.from_pretrained(source_folder).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stage2", trust_remote_code=True).eval()
    ids = torch.randint(3, 256, (2, TINY_WINDOW))
    assert torch.equal(model(ids).logits, source(ids).logits)


@torch.no_grad()
def test_evaluation_baselines_and_swapped_sets_keep_the_source_inside_the_window(llama3_checkpoint):
    source_folder, output = llama3_checkpoint
    checkpoint = load_factor_set(output / "longrope_factors.json")
    sets = comparison_sets(checkpoint, baselines=True)
    llama3 = base_factor_set(LLAMA3, 10000.0, 2 * HALF, TINY_WINDOW)
    assert list(sets) == ["LongRoPE (init:llama3)", "none", "pi", "ntk", "yarn", "llama3"]
    assert sets["none"].long_factor == llama3.long_factor
    assert sets["pi"].long_factor == [4 * f for f in llama3.long_factor]
    assert all(s.short_set == "source" and s.short_factor == llama3.short_factor for s in sets.values())

    model = load_longrope_model(output, json.loads((output / "config.json").read_text()))
    source_inv_freq = LlamaForCausalLM.from_pretrained(source_folder).model.rotary_emb.inv_freq
    use_factor_set(model, replace(checkpoint, short_factor=[1.5] * HALF, short_set="factors"))  # as --short does
    assert not torch.equal(model.model.rotary_emb.short_inv_freq, source_inv_freq)
    use_factor_set(model, sets["pi"])
    assert torch.equal(model.model.rotary_emb.short_inv_freq, source_inv_freq)


def test_the_long_attention_scale_follows_the_extension_beyond_the_source(tmp_path):
    """Llama 3.1 to 512k: sqrt(1 + ln 4 / ln 131072) from its window, not from the 8k it was pretrained at."""
    head_dim, rope_theta, window, rope = BASE_CASES["Llama-3.1-8B"]
    fingerprint = read_fingerprint(tmp_path, head_dim, rope_theta, window, rope)
    source_set = source_factor_set(fingerprint, 524288)
    assert source_set.long_mscale == math.sqrt(1 + math.log(4) / math.log(131072))
    assert source_set.provenance["composition"] == {"base": "llama3", "extends": [131072, 524288],
                                                    "attention_scale": "extension"}
    with pytest.raises(LongRoPEError, match="^target 131072 must be larger than the source's context window 131072"
                       ) as raised:
        source_factor_set(fingerprint, 131072)
    assert (raised.value.setting, raised.value.value, raised.value.bound) == ("target", 131072, 131072)


def read_fingerprint(tmp_path: Path, head_dim: int, rope_theta: float, window: int, rope: dict) -> ModelFingerprint:
    config = tiny_llama_config(head_dim=head_dim, max_position_embeddings=window,
                               rope_parameters={**rope, "rope_theta": rope_theta}).to_dict()
    return describe_config(config, "llama-3.1-like", tmp_path).fingerprint


@pytest.fixture(scope="module")
def longrope_stage(tiny_llama_dir, tmp_path_factory):
    """A tiny LongRoPE checkpoint (64 -> 256) with n_hat 4 and short factors that are not 1.0."""
    root = tmp_path_factory.mktemp("stage")
    fingerprint = read_source(tiny_llama_dir).fingerprint
    factors = FactorSet(model=fingerprint, target_length=TARGET, long_factor=[1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
                        short_factor=[1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0], n_hat=4, long_mscale=1.2,
                        short_mscale=1.05, provenance={"method": "search"})
    factors.save(root / "stage1.json")
    done = convert(tiny_llama_dir, root / "stage1", TARGET, "--factors", root / "stage1.json")
    assert done.returncode == 0, done.stderr
    return root / "stage1", factors


@pytest.mark.parametrize("method", ["pi", "default"])
@torch.no_grad()
def test_reconverting_a_longrope_checkpoint_keeps_its_factors(longrope_stage, tmp_path, method):
    stage, first = longrope_stage
    done = convert(stage, tmp_path / "stage2", 2 * TARGET, *(["--factors", method] if method != "default" else []))
    assert done.returncode == 0, done.stderr
    second = load_factor_set(tmp_path / "stage2" / "longrope_factors.json")
    assert second.short_factor == first.short_factor and second.n_hat == 4 and second.short_mscale == 1.05
    assert second.model.original_max_position_embeddings == TINY_WINDOW  # the switch stays at the first window
    relative = [new / old for new, old in zip(second.long_factor, first.long_factor)]
    assert all(r >= 1 for r in relative) and (method != "pi" or relative == pytest.approx([2.0] * HALF))
    assert second.model.rope_scaling["long_factor"] == first.long_factor
    assert second.provenance["composition"]["extends"] == [TARGET, 2 * TARGET]
    if method == "default":  # the llama3 init's own attention scale, 1, on top of the first stage's
        assert second.long_mscale == pytest.approx(1.2) and second.method == "init:llama3"
    before = AutoModelForCausalLM.from_pretrained(stage, trust_remote_code=True).eval()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "stage2", trust_remote_code=True).eval()
    ids = torch.randint(3, 256, (2, TINY_WINDOW))
    assert torch.equal(after(ids).logits, before(ids).logits)
    assert "bit for bit" in (tmp_path / "stage2" / "README.md").read_text()


def test_a_target_the_longrope_checkpoint_already_reaches_is_refused(longrope_stage, tmp_path):
    done = convert(longrope_stage[0], tmp_path / "out", TARGET - 56)
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == (
        f"error: --target {TARGET - 56} must be larger than the source's context window {TARGET}")
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_a_phi3_layout_longrope_source_composes_as_stock_runs_it(tiny_source, tmp_path):
    edit_json(tiny_source / "config.json", **LAYOUTS["Phi-3 longrope"])
    source = read_source(tiny_source)
    assert source.longrope.target_length == 256 and source.longrope.short_factor == PHI3_LONGROPE["short_factor"]
    assert source.longrope.long_mscale == source.longrope.short_mscale == longrope_attention_factor(4, TINY_WINDOW)
    done = convert(tiny_source, tmp_path / "out", 512, "--factors", "ntk")
    assert done.returncode == 0, done.stderr
    stock = LlamaForCausalLM.from_pretrained(tiny_source).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(3, 256, (1, TINY_WINDOW))
    assert torch.equal(model(ids).logits, stock(ids).logits)


TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"
TESTBED_LLAMA3 = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 128}


def test_the_search_compares_with_baselines_composed_on_the_source():
    base = base_factor_set(TESTBED_LLAMA3, 10000.0, 64, 256)
    source = ModelFingerprint("LlamaForCausalLM", "llama3-testbed", 64, 10000.0, base.original_max_position_embeddings,
                              2, 64, rope_scaling=base.rope_scaling)
    sets = baseline_sets(long_search_task(source, 1024, n_hat=True))
    assert list(sets) == ["none", "pi", "ntk", "yarn", "llama3"]
    for name, factor_set in sets.items():
        assert factor_set.short_set == "source" and factor_set.short_factor == base.short_factor, name
        assert all(new >= old for new, old in zip(factor_set.long_factor, base.long_factor)), name
    assert sets["none"].long_factor == base.long_factor


@torch.no_grad()
def test_the_search_on_a_llama3_source_writes_a_composed_factor_file(tmp_path):
    source = tmp_path / "testbed-llama3"
    shutil.copytree(TESTBED, source)
    edit_json(source / "config.json", rope_parameters={**TESTBED_LLAMA3, "rope_theta": 10000.0})
    out = tmp_path / "searched.json"
    done = subprocess.run([*CLI, "search", str(source), "--target", "1024", "--data",
                           str(DATA / "tom_sawyer_chapters.jsonl"), "--documents", "1", "--max-evals", "6",
                           "--no-baselines", "--out", str(out), "--convert-to", str(tmp_path / "out"), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary, searched = json.loads(done.stdout), load_factor_set(out)
    base = base_factor_set(TESTBED_LLAMA3, 10000.0, 64, 256)
    assert searched.model.rope_scaling == TESTBED_LLAMA3 and searched.short_set == "source"
    # 6 evaluations do not finish the initial population, so the label says no evolution step ran
    assert searched.short_factor == base.short_factor and searched.method == "search:no-evolution"
    relative = [new / old for new, old in zip(searched.long_factor, base.long_factor)]
    assert all(abs(r * 100 - round(r * 100)) < 1e-6 for r in relative) and min(relative) >= 1  # the search's grid
    composition = searched.provenance["composition"]
    measured = composition["attention_scales"]
    assert set(measured) == {"extension", "pretraining"} and composition["extends"] == [256, 1024]
    chosen = min(measured, key=lambda rule: measured[rule]["perplexity"])
    assert composition["attention_scale"] == chosen and searched.long_mscale == measured[chosen]["long_mscale"]
    assert measured["extension"]["long_mscale"] == longrope_attention_factor(4, 256)
    assert measured["pretraining"]["long_mscale"] == longrope_attention_factor(8, 128)
    assert summary["best_perplexity"] == pytest.approx(measured[chosen]["perplexity"], abs=1e-4)

    stock = LlamaForCausalLM.from_pretrained(source).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(3, 2048, (1, 256))
    assert torch.equal(model(ids).logits, stock(ids).logits)


def test_the_card_claims_the_source_inside_the_window_only_when_it_holds(longrope_stage):
    stage, first = longrope_stage
    composed = analytic_factor_set("pi", read_source(stage).fingerprint, 2 * TARGET)
    short_searched = replace(first, short_factor=[1.0] * 4 + [1.5] * 4, provenance={"method": "search:short"})
    cards = {name: model_card(factor_set, None, {}, "me/model")
             for name, factor_set in (("composed", composed), ("short searched", short_searched))}
    assert "give the source model's logits bit for bit" in cards["composed"]
    assert "| source RoPE | `longrope` (" in cards["composed"] and "short set: the source's" in cards["composed"]
    assert "bit for bit" not in cards["short searched"]
    assert "use this checkpoint's own short factors, not the source's RoPE" in cards["short searched"]
