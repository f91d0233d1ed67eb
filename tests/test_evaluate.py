"""Evaluation and reports: perplexity protocols, needle tasks, plots, model card, the eval command."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from conftest import DATA
from longrope_convert.card import front_matter, needle_verdict
from longrope_convert.convert import longrope_config
from longrope_convert.errors import EvaluationError
from longrope_convert.evaluate import (
    check_lengths,
    generate_batch,
    perplexity_by_length,
    sliding_window_nll,
    sliding_windows,
)
from longrope_convert.factors import analytic_factor_set
from longrope_convert.needles import NEEDLE_TASKS, build_item, item_seed, noise_haystack
from longrope_convert.perplexity import document_ids, load_longrope_model, token_nll
from longrope_convert.plots import accuracy_heatmap, factors_plot, perplexity_plot, read_series
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
                    with pytest.raises(EvaluationError, match=f"stride {stride} must be smaller than the length"):
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


@torch.inference_mode()
def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(testbed_1024):
    model, tokenizer, _ = testbed_1024
    haystack = noise_haystack(tokenizer, 1024)
    prompts = [build_item(tokenizer, NEEDLE_TASKS["passkey"], haystack, length, 0.5,
                          item_seed(0, "passkey", length, 0.5, 0)).input_ids for length in (150, 256, 700, 1000)]
    batched = generate_batch(model, tokenizer, prompts, 12)  # within the window of 256 and beyond, padded together
    assert batched == [generate_batch(model, tokenizer, [prompt], 12)[0] for prompt in prompts]
    assert len(set(batched)) > 1


def test_lengths_are_checked_against_their_bounds():
    """The error carries the setting, the value and the bound; its message names the setting as the Python API does,
    and as the command line does when worded with its flags."""
    check_lengths([2, 1024], {"passkey_lengths": [512]}, target=1024, protocol="truncated", stride=256,
                  beyond_target=False)
    check_lengths([4096], {}, target=1024, protocol="truncated", stride=256, beyond_target=True)
    check_lengths([256, 1024], {}, target=1024, protocol="sliding", stride=255, beyond_target=False)
    for lengths, needle, protocol, stride, message, data in [
            ([1], [], "truncated", 256, "lengths 1: a length is at least 2 tokens", ("lengths", 1, 2)),
            ([-64], [], "truncated", 256, "lengths -64: a length is at least 2 tokens", ("lengths", -64, 2)),
            ([], [-100], "truncated", 256, "needle_lengths -100: a length is at least 2 tokens",
             ("needle_lengths", -100, 2)),
            ([2048], [], "truncated", 256, "lengths 2048 is beyond the checkpoint's target of 1,024 tokens; add "
             "beyond_target", ("lengths", 2048, 1024)),
            ([], [1025], "truncated", 256, "needle_lengths 1025 is beyond the checkpoint's target",
             ("needle_lengths", 1025, 1024)),
            ([256, 1024], [], "sliding", 256, "stride 256 must be smaller than the length 256", ("stride", 256, 256))]:
        with pytest.raises(EvaluationError, match="^" + message) as raised:
            check_lengths(lengths, {"needle_lengths": needle}, target=1024, protocol=protocol, stride=stride,
                          beyond_target=False)
        assert (raised.value.setting, raised.value.value, raised.value.bound) == data
        flag = "--" + data[0].replace("_", "-")
        assert raised.value.worded({data[0]: flag}).startswith(flag + " ")


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
    (["--passkey-lengths", "20"], "--passkey-lengths 20 is below the smallest passkey prompt, 104 tokens with this "
                                  "tokenizer (its text without haystack, and 10 answer tokens)"),
    (["--needle-lengths", "300", "--data", DATA / "sherlock_adventures.jsonl"],
     "--needle-lengths 300 is below the smallest niah_multikey prompt, 3"),
    (["--needle-lengths", "1024", "--needles", "vt", "--baselines", "--data", DATA / "sherlock_adventures.jsonl"],
     "the source's own window, 256 tokens (measured with --baselines), is below the smallest vt prompt, 48"),
    (["--needle-lengths", "1024"], "--needle-lengths needs --data: the needle tasks hide their needles in its text"),
    (["--needle-lengths", "600", "--needles", "niah_single,foo", "--data", DATA / "sherlock_adventures.jsonl"],
     "--needles foo: no such task (tasks: niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, passkey)"),
    (["--data", DATA / "sherlock_adventures.jsonl"], "--data needs --lengths (perplexity) or --needle-lengths"),
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
    accuracy_heatmap(accuracy, tmp_path / "k.png", "t")
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
    assert set(results["needles"]["tasks"]["passkey"]["accuracy"]) == {*table, "source"}
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
    # stderr is not a terminal: a status line per document forward (2 documents x 2 lengths x each method) and
    # passkey prompt (each method's, and the source's), in order, with the time left once it can be estimated
    steps = 2 * 2 * len(json.loads(done.stdout)["perplexity"]["perplexity"]) + len((checkpoint / "eval" / "needle_answers.jsonl").read_text().splitlines())
    progress = [line for line in done.stderr.splitlines() if line.startswith("eval: ")]
    assert [line.split(" done")[0] for line in progress] == [
        f"eval: {step}/{steps} document forwards and needle prompts" for step in range(1, steps + 1)]
    assert all(re.search(r" done, about (\d+ s|\d+ min \d\d s) left$", line) for line in progress[1:])
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
    assert set(read_series(checkpoint / "eval" / "passkey.png")) == {*table, "source"}
    passkey = results["needles"]["tasks"]["passkey"]["accuracy"]
    assert passkey["source"].keys() == {"256"} and all(by_length.keys() == {"512"} for name, by_length in
                                                        passkey.items() if name != "source")
    assert set(read_series(checkpoint / "eval" / "factors.png")) == set(table)
    card = (checkpoint / "README.md").read_text()
    assert "## Evaluation" in card and "![perplexity](eval/perplexity.png)" in card
    assert front_matter(card) == front_matter(before)
    row = next(line for line in card.splitlines() if line.startswith("| none |"))
    assert f"{table['none']['1024']:.3f}" in row


def test_eval_command_measures_the_needle_tasks(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    done = subprocess.run([*CLI, "eval", str(tiny_checkpoint), "--needle-lengths", "1024", "--needles",
                           "niah_single,niah_multivalue", "--data", str(DATA / "sherlock_adventures.jsonl"),
                           "--depths", "0.5", "--trials", "1", "--out", str(out), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    needles = json.loads(done.stdout)["needles"]
    assert needles["chat_template"] is False and needles["source_window"] is None  # no baselines: no source row
    assert needles["haystack"].endswith("sherlock_adventures.jsonl:1")
    assert list(needles["tasks"]) == ["niah_single", "niah_multivalue"]
    for task, measured in needles["tasks"].items():
        assert measured["answer_tokens"] == 128
        assert measured["accuracy"] == {"LongRoPE (init:yarn)": {"1024": {"0.5": 0.0}}}  # 2.2M parameters
        assert read_series(out / f"{task}.png") == measured["accuracy"]
    answers = [json.loads(line) for line in (out / "needle_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and {a["score"] for a in answers} == {0.0}
    assert all(len(a["answers"]) == (1 if a["task"] == "niah_single" else 4) for a in answers)


def needle_results(source: float, checkpoint: dict[int, float], yarn: dict[int, float]) -> dict:
    """results.json's needles with one task: the source's accuracy at its window of 256 tokens, the two methods'."""
    accuracy = {"LongRoPE": {str(n): {"0.5": a} for n, a in checkpoint.items()},
                "yarn": {str(n): {"0.5": a} for n, a in yarn.items()}, "source": {"256": {"0.5": source}}}
    return {"depths": [0.5], "trials": 1, "seed": 0, "chat_template": True, "haystack": "books", "source_window": 256,
            "tasks": {"niah_single": {"accuracy": accuracy}}}


def test_the_verdict_ranks_methods_only_on_tasks_the_source_can_do():
    assert needle_verdict(needle_results(0.25, {1024: 0.5}, {1024: 0.0})) == [
        "At its own window (256 tokens) the source model scores under 50% on niah_single (25%): reported, not used "
        "to rank the methods.", "No task is left to rank the methods with."]
    assert needle_verdict(needle_results(1.0, {512: 0.75, 1024: 0.5}, {512: 0.5, 1024: 0.5})) == [
        "At 512 tokens, on niah_single (the source scores at least 50% on it at its own window, 100%), LongRoPE "
        "retrieves better than YaRN on the same prompts: 75% against 50%.",
        "At 1,024 tokens, on niah_single (the source scores at least 50% on it at its own window, 100%), LongRoPE "
        "retrieves as well as YaRN on the same prompts: 50% against 50%."]
    no_baselines = {**needle_results(1.0, {1024: 1.0}, {}), "source_window": None}
    assert needle_verdict(no_baselines) == []
