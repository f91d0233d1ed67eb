"""Evaluation and reports: perplexity protocols, passkey, plots, model card, the eval command."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from conftest import DATA
from longrope_convert.card import front_matter
from longrope_convert.convert import longrope_config
from longrope_convert.errors import EvaluationError
from longrope_convert.evaluate import (
    PASSKEY_ANSWER_TOKENS,
    check_lengths,
    passkey_prompt,
    passkey_trials,
    perplexity_by_length,
    read_passkey,
    sliding_window_nll,
    sliding_windows,
)
from longrope_convert.factors import analytic_factor_set
from longrope_convert.perplexity import document_ids, load_longrope_model, token_nll
from longrope_convert.plots import factors_plot, passkey_heatmap, perplexity_plot, read_series
from longrope_convert.source import read_source
from test_convert import run_cli

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"
CLI = [sys.executable, "-m", "longrope_convert"]


def strict_json(text: str):
    """JSON as every reader takes it: no Infinity or NaN tokens."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


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
    table = perplexity_by_length(model, [document_ids(tokenizer, text, 600)], {"m": factor_set}, [600])
    assert abs(table["m"][600] / reference - 1) < 1e-5


def brute_force_windows(total: int, length: int, stride: int) -> dict[int, int]:
    """{target: begin of the window that scores it}: windows start at 0, stride, 2 stride, ... and each
    target goes to the first window holding both it and the token before it."""
    owner = {}
    for target in range(1, total):
        begin = 0
        while not (begin <= target - 1 and target < begin + length):
            begin += stride
        owner[target] = begin
    return owner


def test_sliding_windows_score_every_target_exactly_once():
    for total in range(2, 41):
        for length in range(2, total + 3):
            for stride in range(1, length + 3):
                if total > length and stride >= length:
                    with pytest.raises(EvaluationError, match=f"--stride {stride} must be smaller than the length"):
                        sliding_windows(total, length, stride)
                    continue
                scored = {target: begin for begin, end, first in sliding_windows(total, length, stride)
                          for target in range(first, end)}
                assert sum(end - first for _, end, first in sliding_windows(total, length, stride)) == total - 1
                assert scored == brute_force_windows(total, length, stride), (total, length, stride)
                assert all(end - begin <= length for begin, end, _ in sliding_windows(total, length, stride))


@torch.inference_mode()
@pytest.mark.parametrize("length,stride", [(300, 300), (300, 5000), (120, 40), (120, 119), (64, 17), (128, 300),
                                           (256, 256)])
def test_sliding_window_nll_is_the_brute_force_reference(testbed_1024, length, stride):
    model, tokenizer, _ = testbed_1024
    ids = document_ids(tokenizer, (DATA / "sherlock_holmes_excerpt.txt").read_text(), 300)
    if stride >= length < ids.shape[1]:  # the gap between two windows would go unscored
        with pytest.raises(EvaluationError):
            sliding_window_nll(model, ids, length, stride)
        return
    owner = brute_force_windows(ids.shape[1], length, stride)
    by_window = {begin: token_nll(model, ids[:, begin:begin + length])[0] for begin in set(owner.values())}
    reference = torch.stack([by_window[begin][target - begin - 1] for target, begin in owner.items()])
    nll = sliding_window_nll(model, ids, length, stride)
    assert nll.shape == (ids.shape[1] - 1,)
    assert torch.allclose(nll, reference, atol=1e-5)


@torch.inference_mode()
def test_sliding_protocol_with_one_window_is_the_truncated_one(testbed_1024):
    model, tokenizer, factor_set = testbed_1024
    documents = [document_ids(tokenizer, (DATA / "sherlock_holmes_excerpt.txt").read_text(), 512)]
    truncated = perplexity_by_length(model, documents, {"m": factor_set}, [512])
    sliding = perplexity_by_length(model, documents, {"m": factor_set}, [512], "sliding", stride=512)
    assert sliding["m"][512] == pytest.approx(truncated["m"][512], rel=1e-6)


@pytest.mark.parametrize("length", [1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_has_the_key_at_depth_and_fits_the_length(length, depth):
    tokenizer = AutoTokenizer.from_pretrained(TESTBED)
    ids, key_at = passkey_prompt(tokenizer, length, depth, "48213")
    passage = len(tokenizer(" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
                            "again.", add_special_tokens=False).input_ids)
    assert length - passage < ids.shape[1] <= length
    assert tokenizer.decode(ids[0, key_at:]).lstrip().startswith("The pass key is 48213. Remember it.")
    assert "48213" not in tokenizer.decode(ids[0, :key_at])
    filler = ids.shape[1] - 60  # tokens of intro, key sentence and question are few
    assert abs(key_at / ids.shape[1] - depth) <= 0.03 + 60 / filler
    assert tokenizer.decode(ids[0]).endswith("What is the pass key? The pass key is")


def test_passkey_trials_fit_prompt_and_answer_in_the_length_or_refuse():
    tokenizer = AutoTokenizer.from_pretrained(TESTBED)
    trials = passkey_trials(tokenizer, [136, 200, 513], [0.0, 0.5, 1.0], trials=2, seed=3)
    assert sorted(trials) == [(n, d) for n in (136, 200, 513) for d in (0.0, 0.5, 1.0)]
    for (length, _), prompts in trials.items():
        assert len(prompts) == 2 and len({key for _, key in prompts}) == 2
        assert all(ids.shape[1] + PASSKEY_ANSWER_TOKENS <= length for ids, _ in prompts)
    again = passkey_trials(tokenizer, [136, 200, 513], [0.0, 0.5, 1.0], trials=2, seed=3)
    assert all(torch.equal(ids, same) and key == same_key
               for cell in trials for (ids, key), (same, same_key) in zip(trials[cell], again[cell]))
    with pytest.raises(EvaluationError, match=r"^--passkey-lengths 135 is below the smallest passkey prompt, 136 "
                                              r"tokens with this tokenizer"):
        passkey_trials(tokenizer, [135], [0.0, 0.5, 1.0], trials=2, seed=3)


@pytest.mark.parametrize("answer,key", [(" 48213.", "48213"), ("48213", "48213"), (" **48213**", "48213"),
                                        (" 48 213", "48213"), (" 48,213!", "48213"), ("\n48213\nWhat", "48213"),
                                        (" 482130", "482130"), (" unknown", None), (" 4821", "4821"),
                                        (" 71432, 71432", "71432"), (" 71432 71432.", "71432"),
                                        (" 71,432, 71,432", "71432"), ("\n71432\n71432", "71432")])
def test_passkey_answers_are_read_from_generated_text(answer, key):
    assert read_passkey(answer) == key


def test_lengths_are_checked_against_their_bounds():
    check_lengths([2, 1024], [512], target=1024, protocol="truncated", stride=256, beyond_target=False)
    check_lengths([4096], [], target=1024, protocol="truncated", stride=256, beyond_target=True)
    check_lengths([256, 1024], [], target=1024, protocol="sliding", stride=255, beyond_target=False)
    for lengths, passkey, protocol, stride, message in [
            ([1], [], "truncated", 256, "--lengths 1: a length is at least 2 tokens"),
            ([-64], [], "truncated", 256, "--lengths -64: a length is at least 2 tokens"),
            ([], [-100], "truncated", 256, "--passkey-lengths -100: a length is at least 2 tokens"),
            ([2048], [], "truncated", 256, "--lengths 2048 is beyond the checkpoint's target of 1,024 tokens"),
            ([], [1025], "truncated", 256, "--passkey-lengths 1025 is beyond the checkpoint's target"),
            ([256, 1024], [], "sliding", 256, "--stride 256 must be smaller than the length 256")]:
        with pytest.raises(EvaluationError, match="^" + message):
            check_lengths(lengths, passkey, target=1024, protocol=protocol, stride=stride, beyond_target=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    checkpoint = tmp_path_factory.mktemp("eval") / "tiny-1024"
    subprocess.run([*CLI, str(TESTBED), "--target", "1024", "--factors", "yarn", "--output", str(checkpoint)],
                   check=True, capture_output=True)
    return checkpoint


@pytest.mark.parametrize("args,message", [
    (["--lengths", "0"], "--lengths 0: a length is at least 2 tokens"),
    (["--lengths", "-64"], "--lengths -64: a length is at least 2 tokens"),
    (["--lengths", "4096"], "--lengths 4096 is beyond the checkpoint's target of 1,024 tokens; add --beyond-target"),
    (["--passkey-lengths", "20"], "--passkey-lengths 20 is below the smallest passkey prompt, 136 tokens"),
    (["--lengths", "256,1024", "--protocol", "sliding", "--stride", "256"], "--stride 256 must be smaller than"),
    (["--lengths", "256", "--data", "missing-folder/book.txt"], "data 'missing-folder/book.txt': no such file or folder"),
])
def test_eval_refuses_what_it_cannot_measure_in_one_line(tiny_checkpoint, capfd, monkeypatch, args, message):
    data = [] if "--data" in args or "--lengths" not in args else ["--data", DATA / "sherlock_adventures.jsonl"]
    code, out, err = run_cli(capfd, monkeypatch, "eval", tiny_checkpoint, *args, *data)
    assert code == 1 and err.splitlines() == [f"error: {err.splitlines()[0][7:]}"], err
    assert err.startswith("error: " + message), err
    assert out == ""


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


def scaled_copy(checkpoint: Path, folder: Path, scale: dict[str, float]) -> Path:
    """A copy of a checkpoint with some weights multiplied (a new weight file, never the linked one)."""
    shutil.copytree(checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    for name, factor in scale.items():
        weights[name] = weights[name] * factor
    (folder / "model.safetensors").unlink()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("value,scale", [
    ("inf", {"model.embed_tokens.weight": 1e3}),  # tied LM head: logits x 1e3, mean NLL far above 709.78
    ("nan", {f"model.layers.0.self_attn.{p}_proj.weight": 1e20 for p in "qk"}),  # q.k overflows: inf - inf
])
def test_inf_and_nan_perplexities_are_recorded_as_such(tiny_checkpoint, tmp_path, capfd, monkeypatch, value, scale):
    folder = scaled_copy(tiny_checkpoint, tmp_path / value, scale)
    code, out, err = run_cli(capfd, monkeypatch, "eval", folder, "--lengths", "256,1024", "--data",
                             DATA / "sherlock_adventures.jsonl", "--documents", "1", "--baselines",
                             "--passkey-lengths", "200", "--depths", "0.5", "--trials", "1", "--card")
    assert code == 0, err
    results = strict_json((folder / "eval" / "results.json").read_text())
    table = results["perplexity"]["perplexity"]
    assert {v for by_length in table.values() for v in by_length.values()} == {value}
    assert read_series(folder / "eval" / "perplexity.png") == table
    assert set(results["passkey"]["accuracy"]) == set(table)
    card = (folder / "README.md").read_text()
    assert f"| none | {value} | {value} |" in card.splitlines() and "inf: the perplexity overflows a double" in card
    assert f"| none | {value} | {value} |" in out.splitlines()


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
    assert list(table) == ["LongRoPE (init:yarn)", "none", "pi", "ntk", "yarn", "llama3"]  # the search's baselines
    assert len({round(by_length["256"], 6) for by_length in table.values()}) == 1  # inside the window: the source
    assert len({round(by_length["1024"], 6) for by_length in table.values()}) == 5  # yarn is the checkpoint's set
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
