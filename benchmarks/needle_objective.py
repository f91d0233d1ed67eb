"""The needle-driven search objective (`search --objective needle`) against perplexity, at 8x on the testbeds.

    python benchmarks/search_quality.py --work W --variants default-no-n-hat needle --seeds 0 1 2
    python benchmarks/search_quality.py --work W --variants ppl+needle --seeds 0 1 2 --reuse W/*default-no-n-hat-*.log.jsonl
    python benchmarks/needle_objective.py --work W
    # the testbed trained to retrieve (tests/testbed/train.py --needles), with the task it retrieves in its window:
    python benchmarks/search_quality.py --work W --testbeds tiny-llama-256-needles \
        --variants default-no-n-hat needle-single --seeds 0 1 2
    python benchmarks/search_quality.py --work W --testbeds tiny-llama-256-needles --variants ppl+needle-single \
        --seeds 0 1 2 --reuse W/tiny-llama-256-needles-default-no-n-hat-*.log.jsonl
    python benchmarks/needle_objective.py --work W --testbeds tiny-llama-256-needles \
        --variants default-no-n-hat needle-single ppl+needle-single

The search_quality.py commands search each testbed (window 256) for 2048 tokens on the search text (4 chapters of
Tom Sawyer) with the default preset, with the perplexity objective and with the needle objectives (the --reuse
runs replay the perplexity search and score its finalists on needle items), for each seed. This script then
measures every factor set found, and the analytic sets, on the evaluation text (The Adventures of Sherlock Holmes),
which no search saw and no testbed was trained on:

- held-out perplexity: 4 stories, BOS + their first 2047 tokens (as search_quality.py);
- answer-token perplexity: the needle objective's own measure (needles.objective_items: only the tokens of the
  answer's values scored) on 8 haystack windows of the held-out text, for niah_single and niah_multiquery items;
- retrieval gap: the answer tokens' mean NLL on the same items with the digits of the needles changed (d -> d+5
  mod 10, with_needle_digits_changed) minus that with the true needles, in nats per answer token: what the model takes from the needles. At 0
  the answers are guessed from the prompt alone; a model that copies every digit gets about ln 10 = 2.3;
- NIAH: eval's tasks niah_single, niah_multikey and niah_multiquery (greedy, RULER's string_match_all), needles at
  5 depths x 2 trials, mean score in %.

Writes W/needle_objective-<testbed>.json and prints the Markdown table of BENCHMARKS.md. One thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTBEDS = ROOT / "tests" / "testbed"
EVALUATION_TEXT = ROOT / "tests" / "data" / "sherlock_adventures.jsonl"
TARGET, DOCUMENTS, ITEMS = 2048, 4, 8
TASKS = ("niah_single", "niah_multikey", "niah_multiquery")
ANSWER_TASKS = ("niah_single", "niah_multiquery")
DEPTHS, TRIALS = (0.1, 0.3, 0.5, 0.7, 0.9), 2
VARIANTS = ("default-no-n-hat", "needle", "ppl+needle")  # search_quality.py's, with its labels
BASELINES = ("none", "pi", "ntk", "yarn", "llama3")


def with_needle_digits_changed(tokenizer, item) -> list[int]:
    """The item's ids with the digits in the tokens of its needles' values moved (each token's by 5 mod 10, or by
    the first other shift that gives a token of the vocabulary; a token without one, as the testbeds' 'Ġ19' or
    '00', is kept): the control."""
    vocabulary = tokenizer.get_vocab()
    ids = list(item.input_ids)
    for positions in item.value_positions:
        for position in positions:
            token = tokenizer.convert_ids_to_tokens(ids[position])
            shifted = ("".join(str((int(c) + shift) % 10) if c.isdigit() else c for c in token)
                       for shift in (5, 1, 2, 3, 4, 6, 7, 8, 9))
            ids[position] = vocabulary[next((changed for changed in shifted if changed in vocabulary), token)]
    return ids


def measure(testbed: str, work: Path, seeds: list[int], variants: list[str]) -> dict:
    """Every measure of every factor set (the searches' in `work`, the analytic ones) on the held-out text."""
    import torch
    from transformers import AutoTokenizer

    from longrope_convert.convert import longrope_config
    from longrope_convert.documents import read_documents
    from longrope_convert.evaluate import needle_accuracy, needle_items
    from longrope_convert.evolution import perplexity_of
    from longrope_convert.factors import baseline_factor_sets, factor_set_from_json, source_factor_set
    from longrope_convert.needles import chat_frame, haystack_windows, objective_items
    from longrope_convert.perplexity import load_longrope_model, tokenized_documents
    from longrope_convert.search import document_nll
    from longrope_convert.source import read_source

    torch.set_num_threads(1)
    source = read_source(TESTBEDS / testbed)
    folder, fingerprint = source.folder, source.fingerprint
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_longrope_model(folder, longrope_config(source.config, source_factor_set(fingerprint, TARGET)))
    sets = {f"{variant}-{seed}": factor_set_from_json(
                json.loads((work / f"{testbed}-{variant}-{seed}.json").read_text())["factor_set"])
            for variant in variants for seed in seeds}
    sets.update(baseline_factor_sets(fingerprint, TARGET))
    documents = tokenized_documents(tokenizer, read_documents([str(EVALUATION_TEXT)]), TARGET, DOCUMENTS)[0]
    texts = [(document.name, document.text) for document in read_documents([str(EVALUATION_TEXT)])]
    windows, _ = haystack_windows(tokenizer, texts, TARGET, ITEMS)
    answer_items = {task: objective_items(tokenizer, windows, TARGET, task=task, chat=chat_frame(tokenizer, True))
                    for task in ANSWER_TASKS}
    niah, _ = needle_items(tokenizer, {task: [TARGET] for task in TASKS}, list(DEPTHS), TRIALS, seed=0,
                           haystack_texts=texts)
    results = {}
    with torch.inference_mode():
        for name, factor_set in sets.items():
            results[name] = {"held_out": perplexity_of(document_nll(model, factor_set, ids) for ids in documents)}
            for task, items in answer_items.items():
                answer, control = [], []
                for item in items:
                    scored = torch.tensor(item.answer_positions)
                    answer.append(document_nll(model, factor_set, torch.tensor([item.input_ids]), scored))
                    control.append(document_nll(model, factor_set, torch.tensor(
                        [with_needle_digits_changed(tokenizer, item)]), scored))
                tokens = sum(count for _, count in answer)
                results[name][task] = {"answer_ppl": perplexity_of(answer), "retrieval_gap": (
                    sum(nll for nll, _ in control) - sum(nll for nll, _ in answer)) / tokens}
            print(f"{testbed} {name}: {results[name]}", flush=True)
    accuracy, answers = needle_accuracy(model, tokenizer, sets, niah, {name: {task: [TARGET] for task in TASKS}
                                                                     for name in sets}, batch_size=5)
    for name in sets:
        results[name]["niah"] = {task: 100 * statistics.mean(accuracy[task][name][TARGET].values()) for task in TASKS}
    return {"testbed": testbed, "seeds": seeds, "variants": variants, "sets": results, "answers": answers,
            "answer_tokens": {task: sum(len(item.answer_positions) for item in items)
                              for task, items in answer_items.items()}}


def table(measured: dict) -> str:
    """The Markdown table of one testbed: per search variant, each seed and the median; then the analytic sets."""
    from search_quality import VARIANTS as LABELS

    sets, seeds = measured["sets"], measured["seeds"]
    tokens = ", ".join(f"{task} {count}" for task, count in measured["answer_tokens"].items())
    lines = [f"**{measured['testbed']}** (answer tokens in the {ITEMS} held-out items: {tokens})", "",
             "| factors | held-out ppl | " + " | ".join(f"{task}: answer ppl | {task}: retrieval gap"
                                                      for task in ANSWER_TASKS)
             + " | " + " | ".join(f"NIAH {task} %" for task in TASKS) + " |",
             "|---|---|" + "---|---|" * len(ANSWER_TASKS) + "---|" * len(TASKS)]

    def cells(values: list[float], digits: int) -> str:
        each = " / ".join(f"{v:.{digits}f}" for v in values)
        return f"{each} (**{statistics.median(values):.{digits}f}**)" if len(values) > 1 else each

    def row(label: str, runs: list[dict]) -> str:
        answer = [cells([r[task][key] for r in runs], digits) for task in ANSWER_TASKS
                  for key, digits in (("answer_ppl", 2), ("retrieval_gap", 3))]
        niah = [cells([r["niah"][task] for r in runs], 0) for task in TASKS]
        return f"| {label} | {cells([r['held_out'] for r in runs], 3)} | " + " | ".join(answer + niah) + " |"

    for variant in measured["variants"]:
        lines.append(row(f"{LABELS[variant].label}, seeds {', '.join(map(str, seeds))}",
                         [sets[f"{variant}-{seed}"] for seed in seeds]))
    lines += [row(name, [sets[name]]) for name in BASELINES]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="search_quality.py's --work folder")
    parser.add_argument("--testbeds", nargs="+", default=["tiny-llama-256", "tiny-llama3-256"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    for testbed in args.testbeds:
        out = args.work / f"needle_objective-{testbed}.json"
        if not out.exists():
            out.write_text(json.dumps(measure(testbed, args.work, args.seeds, args.variants), indent=1))
        print(table(json.loads(out.read_text())) + "\n", flush=True)


if __name__ == "__main__":
    main()
