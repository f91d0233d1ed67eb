"""Does a testbed retrieve? Answer-token NLL of gold needle items with the true needles against a control.

    python benchmarks/needle_retrieval.py [--testbeds tiny-llama-256-needles tiny-llama-256] [--items 20]

Gold items (needles.build_item, gold=True: the expected answer follows the prompt) of niah_single, niah_multikey,
niah_multiquery and passkey, their haystack cut from the held-out text (4 stories of Sherlock Holmes,
tests/data/sherlock_adventures.jsonl; the passkey's is its noise filler), `--items` per task and length, first
needles at depths spread over [0, 1]. The control is the same item with every digit of every needle changed
(d -> (d + 5) % 10 token by token; control_token), so its needles no longer hold the answer: a model that
retrieves scores the answer far better with the true needles; one that does not, the same.

(a) at 256 tokens (the testbeds' window) with the source's own RoPE, for the tasks whose gold items fit;
(b) at 2048 tokens with factors.analytic_factor_set (yarn, llama3, pi, ntk), factors.source_factor_set ("none")
and factors/tiny-llama-256/2048.json ("searched"), the model loaded as benchmarks/search_quality.py's Scorer
loads it. Then greedy answers at 256 (the prompt of each gold item, as many tokens generated as its answer has),
scored by needles.string_match_all as eval scores them and by the share of answer digits right in place; and
perplexity on the held-out text at 256 (every 256-token window of the 4 stories: tokenized_documents with windows).
One thread.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from longrope_convert.convert import longrope_config
from longrope_convert.documents import read_documents
from longrope_convert.factors import FactorSet, analytic_factor_set, load_factor_set, source_factor_set
from longrope_convert.needles import (NEEDLE_TASKS, NeedleItem, build_item, item_seed, noise_haystack,
                                      required_tokens, string_match_all)
from longrope_convert.perplexity import load_longrope_model, perplexity, token_nll, tokenized_documents, use_factor_set
from longrope_convert.source import read_source

ROOT = Path(__file__).resolve().parent.parent
TESTBEDS = ROOT / "tests" / "testbed"
sys.path.insert(0, str(TESTBEDS))  # train.py's haystack cut
from train import haystack_cut  # noqa: E402

EVALUATION_TEXT = ROOT / "tests" / "data" / "sherlock_adventures.jsonl"
SEARCHED = ROOT / "factors" / "tiny-llama-256" / "2048.json"
TASKS = ("niah_single", "niah_multikey", "niah_multiquery", "passkey")
WINDOW, TARGET = 256, 2048
HAYSTACK_CHARS = {WINDOW: 4000, TARGET: 12000}  # enough held-out text for an item of each length
PERPLEXITY_WINDOWS = 100  # more than the 4 stories hold: all of their 256-token windows


def shifted_digits(text: str) -> str:
    """Every digit d of `text` made (d + 5) % 10."""
    return "".join(str((int(c) + 5) % 10) if c.isdigit() else c for c in text)


def control_token(tokenizer, token_id: int) -> int:
    """The token with its digits changed: d -> (d + 5) % 10 when that token exists; else the token of the shifted
    first digit alone, else of the nearest digit above the first one that has a token (with the leading space
    kept: "Ġ1" -> "Ġ2" where the vocabulary has no "Ġ6"). Tokens without digits are kept."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    digits_from = next((i for i, c in enumerate(piece) if c.isdigit()), None)
    if digits_from is None:
        return token_id
    head, first = piece[:digits_from], int(piece[digits_from])
    candidates = [shifted_digits(piece), head + shifted_digits(piece[digits_from])]
    candidates += [head + str((first + step) % 10) for step in range(1, 10)]
    vocabulary = tokenizer.get_vocab()
    return next(vocabulary[candidate] for candidate in candidates if candidate in vocabulary)


def control_ids(tokenizer, item: NeedleItem) -> list[int]:
    """The item's ids with every digit token inside its needles changed (control_token)."""
    ids = list(item.input_ids)
    for first, end in item.needle_spans:
        ids[first:end] = [control_token(tokenizer, token) for token in ids[first:end]]
    return ids


def gold_items(tokenizer, task: str, length: int, count: int, held_out: str) -> list[NeedleItem]:
    """`count` gold items of `task` at `length` tokens, first needles at depths (i + 0.5) / count, each on its own
    cut of the held-out text (or the noise filler); [] when the task's gold items do not fit in `length`."""
    needle_task = NEEDLE_TASKS[task]
    depths = [(i + 0.5) / count for i in range(count)]
    if max(required_tokens(tokenizer, needle_task, item_seed(0, task, length, depth, 0), gold=True)
           for depth in depths) > length:
        return []
    items = []
    for depth in depths:
        cut = random.Random(f"haystack:{task}:{length}:{depth!r}")
        haystack = (noise_haystack(tokenizer, length) if needle_task.haystack == "noise"
                    else haystack_cut(tokenizer, held_out, HAYSTACK_CHARS[length], cut, "held-out text"))
        items.append(build_item(tokenizer, needle_task, haystack, length, depth, item_seed(0, task, length, depth, 0),
                                gold=True))
    return items


def answer_nll(model, tokenizer, items: list[NeedleItem]) -> tuple[float, float]:
    """Mean over items of the mean NLL (nats) of the answer tokens: with the true needles, with the control's."""
    true, control = [], []
    for item in items:
        nll = token_nll(model, torch.tensor([item.input_ids, control_ids(tokenizer, item)]))  # [2, length - 1]
        first, end = item.answer_span
        true.append(nll[0, first - 1 : end - 1].mean().item())
        control.append(nll[1, first - 1 : end - 1].mean().item())
    return statistics.mean(true), statistics.mean(control)


@torch.inference_mode()
def greedy_scores(model, tokenizer, items: list[NeedleItem]) -> tuple[float, float]:
    """Greedy answers (each item's prompt, as many new tokens as its gold answer has): their mean string_match_all,
    and the share of the expected digits answered in place (the answers' digits joined, the output's digits
    joined, compared position by position)."""
    scores, digits_right, digits = [], 0, 0
    for item in items:
        first, end = item.answer_span
        generated = model.generate(torch.tensor([item.input_ids[:first]]), max_new_tokens=end - first,
                                   do_sample=False, pad_token_id=model.config.pad_token_id)
        output = tokenizer.decode(generated[0, first:])
        scores.append(string_match_all(output, item.answers))
        expected, answered = "".join(item.answers), "".join(c for c in output if c.isdigit())
        digits_right += sum(a == b for a, b in zip(expected, answered))
        digits += len(expected)
    return statistics.mean(scores), digits_right / digits


def measure(testbed: str, count: int, held_out: str, searched: FactorSet) -> dict:
    """Every number of the tables for one testbed."""
    from transformers import AutoTokenizer

    source = read_source(TESTBEDS / testbed)
    fingerprint = source.fingerprint
    source_set = source_factor_set(fingerprint, TARGET)
    model = load_longrope_model(source.folder, longrope_config(source.config, source_set))
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    factor_sets = {"none": source_set, **{name: analytic_factor_set(name, fingerprint, TARGET)
                                          for name in ("yarn", "llama3", "pi", "ntk")}, "searched": searched}
    results = {"nll": {}, "greedy": {}}
    use_factor_set(model, source_set)  # the source's own RoPE up to 256
    for task in TASKS:
        items = gold_items(tokenizer, task, WINDOW, count, held_out)
        if items:
            results["nll"][(task, WINDOW, "source")] = answer_nll(model, tokenizer, items)
            results["greedy"][task] = greedy_scores(model, tokenizer, items)
    documents = tokenized_documents(tokenizer, read_documents([str(EVALUATION_TEXT)]), WINDOW, PERPLEXITY_WINDOWS,
                                    windows=True)[0]
    results["perplexity"] = perplexity(torch.cat([token_nll(model, ids) for ids in documents], dim=1))
    results["windows"] = len(documents)
    for task in TASKS:
        items = gold_items(tokenizer, task, TARGET, count, held_out)
        for name, factor_set in factor_sets.items():
            use_factor_set(model, factor_set)
            results["nll"][(task, TARGET, name)] = answer_nll(model, tokenizer, items)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbeds", nargs="+", default=["tiny-llama-256-needles", "tiny-llama-256"])
    parser.add_argument("--items", type=int, default=20, help="items per task and length")
    args = parser.parse_args()
    torch.set_num_threads(1)
    held_out = " ".join(document.text for document in read_documents([str(EVALUATION_TEXT)]))
    started = time.perf_counter()
    measured = {testbed: measure(testbed, args.items, held_out, load_factor_set(SEARCHED)) for testbed in args.testbeds}
    print(f"{args.items} gold items per task and length; {time.perf_counter() - started:.0f} s\n")
    print("Answer-token NLL (nats/token), true needles / control (needle digits changed), and the gap:\n")
    header = "| task | length | RoPE | " + " | ".join(f"{testbed} true / control (gap)" for testbed in args.testbeds)
    print(header + " |\n|" + "---|" * (3 + len(args.testbeds)))
    keys = list(next(iter(measured.values()))["nll"])
    for task, length, rope in keys:
        cells = [measured[testbed]["nll"].get((task, length, rope)) for testbed in args.testbeds]
        print(f"| {task} | {length} | {rope} | " + " | ".join(
            "—" if cell is None else f"{cell[0]:.3f} / {cell[1]:.3f} ({cell[1] - cell[0]:+.3f})" for cell in cells)
            + " |")
    print(f"\nGreedy answers at {WINDOW}: exact match (string_match_all, mean over items) / digits in place:\n")
    print("| task | " + " | ".join(args.testbeds) + " |\n|" + "---|" * (1 + len(args.testbeds)))
    for task in measured[args.testbeds[0]]["greedy"]:
        print(f"| {task} | " + " | ".join("{:.2f} / {:.2f}".format(*measured[t]["greedy"][task])
                                          for t in args.testbeds) + " |")
    print(f"\nPerplexity at {WINDOW} on the held-out text ({measured[args.testbeds[0]]['windows']} windows): "
          + ", ".join(f"{testbed} {measured[testbed]['perplexity']:.3f}" for testbed in args.testbeds))


if __name__ == "__main__":
    main()
