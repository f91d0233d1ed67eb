"""Evaluation of an extended checkpoint: perplexity against length and passkey retrieval, for the
checkpoint's factors and, on the same weights, the classic methods at the same target.

Perplexity protocols:
  truncated  each document: BOS + its first L - 1 tokens, as in the search; the documents are those
             long enough for the largest length, so every column scores the same documents
  sliding    each document's first T tokens (T = the largest length), windows of L tokens started
             every S tokens (the stride); each target token is scored exactly once, by the first window
             that reaches it, with the tokens before it in that window as context (the scheme of
             transformers' "Perplexity of fixed-length models" guide, used by the YaRN paper). S < L,
             so consecutive windows overlap and no target falls between them.
Baselines are factor sets on the same model (the source's RoPE unchanged, and PI, NTK, YaRN composed
on it): like LongRoPE, they use the source's RoPE up to the original window and their own factors
beyond it.

Passkey retrieval: filler passages with a 5-digit key at a chosen depth, then "What is the pass
key?", greedy decoding; accuracy over N trials per length x depth with a fixed seed. Prompt and
answer together fit the length measured.

A perplexity that overflows a double is inf, one computed from NaN logits is nan; results.json
writes them as the strings "inf" and "nan" (JSON has no such numbers; float() reads them back).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .card import json_number, searched_by_evolution
from .errors import DataError, EvaluationError, LongRoPEError
from .factors import FactorSet, baseline_factor_sets
from .perplexity import document_ids, perplexity, token_nll, use_factor_set
from .source import SourceModel

BASELINE_METHODS = ("none", "pi", "ntk", "yarn")
MIN_LENGTH = 2  # one token of context and one to predict


def comparison_sets(checkpoint: FactorSet, baselines: bool) -> dict[str, FactorSet]:
    """The checkpoint's own set first, then the baselines at the same target, composed on the source's RoPE as
    the search's are (factors.baseline_factor_sets)."""
    label = "LongRoPE" if searched_by_evolution(checkpoint) else f"LongRoPE ({checkpoint.method})"
    sets = {label: checkpoint}
    if baselines:
        sets.update(baseline_factor_sets(checkpoint.model, checkpoint.target_length, BASELINE_METHODS[1:]))
    return sets


def _effective_settings(factor_set: FactorSet, length: int) -> tuple:
    """What the model computes with at this length: identical settings give identical results."""
    if length <= factor_set.model.original_max_position_embeddings:
        return ("short", tuple(factor_set.short_factor), factor_set.short_mscale, factor_set.n_hat)
    below_n_hat = factor_set.short_mscale if factor_set.n_hat_mscale == "short" else factor_set.long_mscale
    return ("long", tuple(factor_set.long_factor), factor_set.long_mscale, factor_set.n_hat, below_n_hat)


def sliding_windows(total: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the sliding protocol over `total` tokens, as (begin, end, first target): window
    tokens begin .. end - 1 score targets first .. end - 1, so targets 1 .. total - 1 are each scored
    once. Raises EvaluationError when stride >= length and more than one window is needed (the gap
    between windows would go unscored)."""
    if total > length and not 1 <= stride < length:
        raise EvaluationError(f"--stride {stride} must be smaller than the length {length}: windows that do not "
                              "overlap leave the tokens between them unscored")
    windows, scored, begin = [], 1, 0  # targets 1 .. scored - 1 are done
    while scored < total:
        end = min(begin + length, total)
        windows.append((begin, end, scored))
        scored, begin = end, begin + stride
    return windows


def sliding_window_nll(model, input_ids: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    """NLL [n - 1] of tokens 1 .. n - 1 of input_ids [1, n], each scored once (see sliding_windows)."""
    return torch.cat([token_nll(model, input_ids[:, begin:end])[0][first - begin - 1:]  # targets begin+1 ..
                      for begin, end, first in sliding_windows(input_ids.shape[1], length, stride)])


def perplexity_by_length(model, documents: list[torch.Tensor], sets: dict[str, FactorSet], lengths: list[int],
                         protocol: str = "truncated", stride: int = 256,
                         on_step: Callable[[], None] = lambda: None) -> dict[str, dict[int, float]]:
    """{method: {length: perplexity}} over documents [1, >= max(lengths)] (inf or nan when so)."""
    results: dict[str, dict[int, float]] = {name: {} for name in sets}
    done: dict[tuple, float] = {}
    for length in lengths:
        for name, factor_set in sets.items():
            key = (_effective_settings(factor_set, length), length)
            if key not in done:
                use_factor_set(model, factor_set)
                if protocol == "truncated":
                    nll = torch.cat([token_nll(model, ids[:, :length])[0] for ids in documents])
                else:
                    nll = torch.cat([sliding_window_nll(model, ids, length, stride) for ids in documents])
                done[key] = perplexity(nll)
            results[name][length] = done[key]
            on_step()
    return results


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_ANSWER_TOKENS = 10
PASSKEY_DIGITS = 5


def _passkey_ids(tokenizer, passages: int, depth: float, key: str) -> tuple[torch.Tensor, int]:
    before = round(passages * depth)
    head = PASSKEY_INTRO + PASSKEY_FILLER * before
    text = head + PASSKEY_LINE.format(key=key) + PASSKEY_FILLER * (passages - before) + PASSKEY_QUESTION
    ids = document_ids(tokenizer, text)
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    key_at = next(i for i, (_, end) in enumerate(spans) if end > len(head)) + ids.shape[1] - len(spans)
    return ids, key_at


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[torch.Tensor, int]:
    """Token ids [1, n] of the standard passkey prompt with as many filler passages as fit in `length`
    tokens (length - one passage < n <= length), the key after `depth` of them; and the index of the
    token where the key sentence starts. Raises ValueError when not even one passage fits."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fixed = count(PASSKEY_INTRO) + count(PASSKEY_LINE.format(key=key)) + count(PASSKEY_QUESTION) + 1  # + BOS
    passages = max(1, round((length - fixed) / count(PASSKEY_FILLER * 8) * 8))  # the estimate, then fitted
    ids, key_at = _passkey_ids(tokenizer, passages, depth, key)
    while ids.shape[1] > length and passages > 1:
        passages -= 1
        ids, key_at = _passkey_ids(tokenizer, passages, depth, key)
    if ids.shape[1] > length:
        raise ValueError(f"a passkey prompt with one filler passage has {ids.shape[1]} tokens, over {length}")
    while (longer := _passkey_ids(tokenizer, passages + 1, depth, key))[0].shape[1] <= length:
        (ids, key_at), passages = longer, passages + 1
    return ids, key_at


def passkey_trials(tokenizer, lengths: list[int], depths: list[float], trials: int,
                   seed: int = 0) -> dict[tuple[int, float], list[tuple[torch.Tensor, str]]]:
    """{(length, depth): [(prompt ids [1, n], key), ...]} with n + PASSKEY_ANSWER_TOKENS <= length; the
    keys drawn from `seed`. Raises EvaluationError for a length below the smallest prompt (one filler
    passage) plus the answer."""
    rng = random.Random(seed)
    keys = {(length, depth, trial): f"{rng.randint(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS - 1)}"
            for length in lengths for depth in depths for trial in range(trials)}
    for length in lengths:  # the smallest prompt's size varies a little with the key and depth
        minimum = max(_passkey_ids(tokenizer, 1, depth, key)[0].shape[1] + PASSKEY_ANSWER_TOKENS
                      for (n, depth, _), key in keys.items() if n == length)
        if length < minimum:
            raise EvaluationError(f"--passkey-lengths {length} is below the smallest passkey prompt, {minimum} tokens "
                                  f"with this tokenizer (intro, one filler passage, key, question and "
                                  f"{PASSKEY_ANSWER_TOKENS} answer tokens)")
    prompts: dict[tuple[int, float], list[tuple[torch.Tensor, str]]] = {}
    for (length, depth, _), key in keys.items():
        ids, _ = passkey_prompt(tokenizer, length - PASSKEY_ANSWER_TOKENS, depth, key)
        prompts.setdefault((length, depth), []).append((ids, key))
    return prompts


def read_passkey(generated: str, digits: int = PASSKEY_DIGITS) -> str | None:
    """The first number the model answered. Digit groups split by spaces or commas ("48 213", "48,213")
    are joined until they make `digits` digits, so a repeated key ("71432, 71432") is read once."""
    match = re.search(r"\d+(?:[,\s]+\d+)*", generated)
    if match is None:
        return None
    number = ""
    for group in re.findall(r"\d+", match.group(0)):
        if len(number) >= digits:
            break
        number += group
    return number


@torch.inference_mode()
def passkey_accuracy(model, tokenizer, sets: dict[str, FactorSet],
                     prompts: dict[tuple[int, float], list[tuple[torch.Tensor, str]]],
                     on_step: Callable[[], None] = lambda: None) -> dict[str, dict[int, dict[float, float]]]:
    """{method: {length: {depth: accuracy}}} over the prompts of passkey_trials, greedy decoding."""
    results: dict[str, dict[int, dict[float, float]]] = {name: {} for name in sets}
    done: dict[tuple, float] = {}
    for name, factor_set in sets.items():
        use_factor_set(model, factor_set)
        for (length, depth), trials in prompts.items():
            settings = (_effective_settings(factor_set, length), length, depth)
            if settings not in done:
                correct = 0
                for ids, key in trials:
                    out = model.generate(ids.to(model.device), max_new_tokens=PASSKEY_ANSWER_TOKENS,
                                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
                    correct += read_passkey(tokenizer.decode(out[0, ids.shape[1]:])) == key
                    on_step()
                done[settings] = correct / len(trials)
            else:
                for _ in trials:
                    on_step()
            results[name].setdefault(length, {})[depth] = done[settings]
    return results


@dataclass
class EvaluationPlan:
    """What an evaluation measures, checked and prepared (documents tokenized, passkey prompts built)
    before the model is loaded, so bad input fails in a second."""

    source: SourceModel
    sets: dict[str, FactorSet]
    tokenizer: Any
    lengths: list[int]
    protocol: str
    stride: int
    documents: list[torch.Tensor]  # [1, max(lengths)] each
    document_names: list[str]
    skipped_documents: int  # shorter than max(lengths), or empty
    passkey: dict[tuple[int, float], list[tuple[torch.Tensor, str]]]
    depths: list[float]
    trials: int
    seed: int

    @property
    def steps(self) -> int:
        """Measurements, for progress: one per method and length, one per method and passkey trial."""
        return len(self.sets) * (len(self.lengths) + sum(len(trials) for trials in self.passkey.values()))


def check_lengths(lengths: list[int], passkey_lengths: list[int], target: int, protocol: str, stride: int,
                  beyond_target: bool) -> None:
    """Raise EvaluationError, naming the flag, the value and the bound, for a length that cannot be
    measured as labelled: below MIN_LENGTH, beyond the checkpoint's target (unless beyond_target), or
    a sliding stride that leaves tokens unscored."""
    for flag, values in (("--lengths", lengths), ("--passkey-lengths", passkey_lengths)):
        for length in values:
            if length < MIN_LENGTH:
                raise EvaluationError(f"{flag} {length}: a length is at least {MIN_LENGTH} tokens (context and a "
                                      "token to predict)")
            if length > target and not beyond_target:
                raise EvaluationError(f"{flag} {length} is beyond the checkpoint's target of {target:,} tokens; add "
                                      "--beyond-target to measure extrapolation")
    if protocol == "sliding" and lengths:
        for length in lengths:
            sliding_windows(max(lengths), length, stride)


def plan_evaluation(folder: Path, *, data: list[str], lengths: list[int], baselines: bool = True,
                    protocol: str = "truncated", stride: int = 256, documents: int | None = 4,
                    passkey_lengths: list[int] = (), depths: list[float] = (0.1, 0.5, 0.9), trials: int = 3,
                    seed: int = 0, beyond_target: bool = False, out: Path | None = None,
                    status: Callable[[str], None] = lambda message: None) -> EvaluationPlan:
    """Check the request against the checkpoint and prepare its inputs, without loading the model.

    `lengths` and `passkey_lengths` are in tokens (duplicates dropped, sorted); `documents` is the
    number of documents of at least max(lengths) tokens to score, read no further than needed; `out`
    the results folder run_evaluation will replace (checked here). Raises
    LongRoPEError for a folder that is not a LongRoPE checkpoint, EvaluationError for a length out of
    bounds (see check_lengths, passkey_trials), DataError for unreadable data or no long-enough document.
    """
    from transformers import AutoTokenizer

    from .factors import FACTORS_FILE, load_factor_set
    from .documents import read_documents
    from .perplexity import tokenized_documents
    from .preflight import check_evaluation_inputs
    from .source import read_source

    check_evaluation_inputs(folder, data, out)
    source = read_source(folder)
    if source.longrope is None:
        raise LongRoPEError(f"'{folder}' is not a LongRoPE checkpoint; convert it first with longrope-convert")
    if bool(data) != bool(lengths):
        raise EvaluationError("--data and --lengths go together: perplexity needs documents and lengths")
    if not data and not passkey_lengths:
        raise EvaluationError("nothing to evaluate: give --data with --lengths, and/or --passkey-lengths")
    factors_file = source.folder / FACTORS_FILE
    checkpoint = load_factor_set(factors_file) if factors_file.is_file() else source.longrope
    lengths, passkey_lengths = sorted(set(lengths)), sorted(set(passkey_lengths))
    check_lengths(lengths, passkey_lengths, checkpoint.target_length, protocol, stride, beyond_target)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    docs, names, skipped = [], [], 0
    if data:
        longest = max(lengths)
        docs, names, skipped = tokenized_documents(tokenizer, read_documents(data), longest, documents)
        if not docs:
            raise DataError(f"--data has no document of at least {longest:,} tokens ({skipped} shorter or empty "
                            "ones skipped)")
        status(f"perplexity: {len(docs)} documents of {longest:,} tokens ({skipped} shorter or empty ones skipped)")
    return EvaluationPlan(source=source, sets=comparison_sets(checkpoint, baselines), tokenizer=tokenizer,
                          lengths=lengths, protocol=protocol, stride=stride, documents=docs, document_names=names,
                          skipped_documents=skipped,
                          passkey=passkey_trials(tokenizer, passkey_lengths, list(depths), trials, seed),
                          depths=list(depths), trials=trials, seed=seed)


def run_evaluation(plan: EvaluationPlan, *, out: Path | None = None, command: str = "",
                   device_map: str | None = None, status: Callable[[str], None] = lambda message: None,
                   on_step: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Measure a plan and write results.json and the plots to `out` (default: the checkpoint's eval/
    folder), replacing what was there only when all is done; `device_map="auto"` spreads the model over
    the GPUs (perplexity.load_longrope_model). Returns the results as written (lengths as int keys; inf
    and nan as strings)."""
    from .card import EVAL_DIR, EVAL_RESULTS
    from .outputs import atomic_folder
    from .perplexity import load_longrope_model
    from .plots import factors_plot, passkey_heatmap, perplexity_plot

    source, sets = plan.source, plan.sets
    checkpoint = next(iter(sets.values()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status(f"model: loading {source.folder} on {device}")
    model = load_longrope_model(source.folder, source.config, device, device_map=device_map)
    results: dict[str, Any] = {"checkpoint": source.name, "target_length": checkpoint.target_length,
                               "original_max_position_embeddings": checkpoint.model.original_max_position_embeddings,
                               "factors": {name: s.long_factor for name, s in sets.items()}}
    if plan.documents:
        table = perplexity_by_length(model, plan.documents, sets, plan.lengths, plan.protocol, plan.stride, on_step)
        results["perplexity"] = {
            "documents": plan.document_names, "skipped_documents": plan.skipped_documents, "protocol": plan.protocol,
            "stride": plan.stride if plan.protocol == "sliding" else None,
            "perplexity": {name: {n: json_number(ppl) for n, ppl in by_length.items()}
                           for name, by_length in table.items()}}
    if plan.passkey:
        results["passkey"] = {"trials": plan.trials, "depths": plan.depths, "seed": plan.seed,
                              "accuracy": passkey_accuracy(model, plan.tokenizer, sets, plan.passkey, on_step)}
    results["settings"] = {"command": command, "device": f"{device}, {str(model.dtype).replace('torch.', '')}",
                           "created": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    out = Path(out) if out is not None else source.folder / EVAL_DIR
    name = Path(source.name).name
    with atomic_folder(out, overwrite=True) as staging:
        (staging / EVAL_RESULTS).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        factors_plot(results["factors"], staging / "factors.png", f"{name}: LongRoPE factors")
        if "perplexity" in results:
            perplexity_plot(results["perplexity"]["perplexity"], staging / "perplexity.png", f"{name}: perplexity")
        if "passkey" in results:
            passkey_heatmap(results["passkey"]["accuracy"], staging / "passkey.png", f"{name}: passkey retrieval")
    return results
