"""Evaluation and reports: perplexity protocols, passkey, plots, model card, the eval command."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from conftest import DATA
from longrope_convert.card import front_matter, model_card
from longrope_convert.convert import longrope_config
from longrope_convert.evaluate import (
    comparison_sets,
    passkey_prompt,
    perplexity_by_length,
    read_passkey,
    sliding_window_nll,
)
from longrope_convert.factors import analytic_factor_set, load_factor_set
from longrope_convert.perplexity import Document, load_longrope_model, token_nll
from longrope_convert.plots import factors_plot, passkey_heatmap, perplexity_plot, read_series
from longrope_convert.source import read_source

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"
CLI = [sys.executable, "-m", "longrope_convert"]


@pytest.fixture(scope="module")
def testbed_1024():
    source = read_source(TESTBED)
    factor_set = analytic_factor_set("yarn", source.fingerprint, 1024)
    model = load_longrope_model(TESTBED, longrope_config(source.config, factor_set))
    return model, AutoTokenizer.from_pretrained(TESTBED), factor_set


@torch.inference_mode()
def test_perplexity_equals_a_hand_computed_reference(testbed_1024):
    model, tokenizer, factor_set = testbed_1024
    text = (DATA / "sherlock_holmes_excerpt.txt").read_text()
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids[:599]
    log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    reference = math.exp(-sum(log_probs[t - 1, ids[t]].item() for t in range(1, 600)) / 599)
    table = perplexity_by_length(model, tokenizer, [Document("sherlock", text)], {"m": factor_set}, [600])
    assert abs(table["perplexity"]["m"][600] / reference - 1) < 1e-5


@torch.inference_mode()
def test_sliding_window_protocol(testbed_1024):
    model, tokenizer, factor_set = testbed_1024
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer((DATA / "sherlock_holmes_excerpt.txt").read_text())
                        .input_ids[:699]])
    assert torch.allclose(sliding_window_nll(model, ids, 700, 700), token_nll(model, ids)[0])
    # stride < length: each token once, with the context of the window that first scores it
    nll = sliding_window_nll(model, ids, 300, 100)
    assert nll.shape == (699,)
    assert torch.allclose(nll[:299], token_nll(model, ids[:, :300])[0])
    assert torch.allclose(nll[299:399], token_nll(model, ids[:, 100:400])[0][-100:], atol=1e-5)
    assert torch.allclose(nll[-100:], token_nll(model, ids[:, 400:700])[0][-100:], atol=1e-5)
    documents = [Document("sherlock", (DATA / "sherlock_holmes_excerpt.txt").read_text())]
    truncated = perplexity_by_length(model, tokenizer, documents, {"m": factor_set}, [512])
    sliding = perplexity_by_length(model, tokenizer, documents, {"m": factor_set}, [512], "sliding", stride=512)
    assert sliding["perplexity"]["m"][512] == pytest.approx(truncated["perplexity"]["m"][512], rel=1e-6)


@pytest.mark.parametrize("length", [1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_has_the_key_at_depth_and_the_length(length, depth):
    tokenizer = AutoTokenizer.from_pretrained(TESTBED)
    ids, key_at = passkey_prompt(tokenizer, length, depth, "48213")
    assert abs(ids.shape[1] - length) <= 0.01 * length
    assert tokenizer.decode(ids[0, key_at:]).lstrip().startswith("The pass key is 48213. Remember it.")
    assert "48213" not in tokenizer.decode(ids[0, :key_at])
    filler = ids.shape[1] - 60  # tokens of intro, key sentence and question are few
    assert abs(key_at / ids.shape[1] - depth) <= 0.03 + 60 / filler
    assert tokenizer.decode(ids[0]).endswith("What is the pass key? The pass key is")


@pytest.mark.parametrize("answer,key", [(" 48213.", "48213"), ("48213", "48213"), (" **48213**", "48213"),
                                        (" 48 213", "48213"), (" 48,213!", "48213"), ("\n48213\nWhat", "48213"),
                                        (" 482130", "482130"), (" unknown", None), (" 4821", "4821")])
def test_passkey_answers_are_read_from_generated_text(answer, key):
    assert read_passkey(answer) == key


def test_plots_carry_their_series(tmp_path):
    ppl = {"LongRoPE": {4096: 12.5, 8192: 11.0}, "pi": {4096: 12.5, 8192: 14.0}}
    perplexity_plot(ppl, tmp_path / "p.png", "t")
    assert read_series(tmp_path / "p.png") == {"LongRoPE": {"4096": 12.5, "8192": 11.0},
                                               "pi": {"4096": 12.5, "8192": 14.0}}
    accuracy = {"LongRoPE": {4096: {0.1: 1.0, 0.9: 0.5}}, "none": {4096: {0.1: 0.0, 0.9: 0.0}}}
    passkey_heatmap(accuracy, tmp_path / "k.png", "t")
    assert read_series(tmp_path / "k.png")["LongRoPE"] == {"4096": {"0.1": 1.0, "0.9": 0.5}}
    factors_plot({"yarn": [1.0, 1.5, 2.0]}, tmp_path / "f.png", "t")
    assert read_series(tmp_path / "f.png") == {"yarn": [1.0, 1.5, 2.0]}
    (tmp_path / "bad.png").write_bytes((tmp_path / "f.png").read_bytes()[:-20] + b"x" * 20)
    with pytest.raises(ValueError):
        read_series(tmp_path / "bad.png")


def test_card_metadata_and_honest_provenance():
    fingerprint = read_source(TESTBED).fingerprint
    init = analytic_factor_set("yarn", fingerprint, 2048)
    card = model_card(init, "me/tiny", {"license": "apache-2.0"}, "me/tiny-longrope", revision="abc123")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata == {"base_model": "me/tiny", "license": "apache-2.0", "library_name": "transformers",
                        "pipeline_tag": "text-generation", "tags": ["longrope", "long-context", "llama"]}
    assert "**not searched**: `init:yarn`" in card and "searched**" not in card.replace("not searched", "")
    assert 'from_pretrained("me/tiny-longrope", trust_remote_code=True, revision="abc123")' in card
    assert "Without remote code" in card and "## Evaluation" not in card
    searched = load_factor_set(Path(__file__).parents[1] / "factors" / "tiny-llama-256" / "2048.json")
    card = model_card(searched, "me/tiny", {}, "me/x")
    assert "Factors **searched** (`search`)" in card and "| evaluations |" in card
    assert "license" not in front_matter(card)


def test_eval_command_writes_results_plots_and_card(tmp_path):
    checkpoint = tmp_path / "tiny-1024"
    subprocess.run([*CLI, str(TESTBED), "--target", "1024", "--factors", "yarn", "--output", str(checkpoint)],
                   check=True, capture_output=True)
    before = (checkpoint / "README.md").read_text()
    assert "## Evaluation" not in before and "**not searched**" in before
    done = subprocess.run([*CLI, "eval", str(checkpoint), "--lengths", "256,1024", "--data",
                           str(DATA / "sherlock_adventures.jsonl"), "--documents", "2", "--baselines",
                           "--passkey-lengths", "512", "--depths", "0.5", "--trials", "1", "--card", "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    table = results["perplexity"]["perplexity"]
    assert list(table) == ["LongRoPE (init:yarn)", "none", "pi", "ntk", "yarn"]
    assert len({round(by_length["256"], 6) for by_length in table.values()}) == 1  # inside the window: the source
    assert len({round(by_length["1024"], 6) for by_length in table.values()}) == 4  # yarn is the checkpoint's set
    assert table["pi"]["1024"] != table["pi"]["256"]
    assert table["none"]["1024"] > table["LongRoPE (init:yarn)"]["1024"]  # beyond the window, scaling helps
    stored = json.loads((checkpoint / "eval" / "results.json").read_text())
    assert stored["perplexity"] == results["perplexity"]
    assert set(read_series(checkpoint / "eval" / "perplexity.png")) == set(table)
    assert set(read_series(checkpoint / "eval" / "passkey.png")) == set(table)
    assert set(read_series(checkpoint / "eval" / "factors.png")) == set(table)
    card = (checkpoint / "README.md").read_text()
    assert "## Evaluation" in card and "![perplexity](eval/perplexity.png)" in card
    assert front_matter(card) == front_matter(before)
    row = next(line for line in card.splitlines() if line.startswith("| none |"))
    assert f"{table['none']['1024']:.3f}" in row
