"""Evaluation of an extended checkpoint: perplexity against length, and retrieval of needles (RULER's tasks
and the passkey test, built by needles.py), for the checkpoint's factors and, on the same weights, the
classic methods at the same target.

Perplexity protocols:
  truncated  each document: BOS + its first L - 1 tokens, as in the search; the documents are those
             long enough for the largest length, so every column scores the same documents
  sliding    each document's first T tokens (T = the largest length), windows of L tokens started
             every S tokens (the stride); each target token is scored exactly once, by the first window
             that reaches it, with the tokens before it in that window as context (the scheme of
             transformers' "Perplexity of fixed-length models" guide, used by the YaRN paper). S < L,
             so consecutive windows overlap and no target falls between them.
Baselines are the search's, on the same model (the source's RoPE unchanged, and PI, NTK, YaRN, llama3
composed on it): like LongRoPE, they use the source's RoPE up to the original window and their own
factors beyond it.

Needle tasks: each task's items at every length, depth and trial (the same prompts for every method),
greedy decoding in batches, each answer scored as its task says; the mean over the trials per length and
depth. With the baselines, the source model is also measured at its own window (SOURCE): a task it scores
under 50% on there is reported, not used to rank the methods (card.needle_verdict).

A perplexity that overflows a double is inf, one computed from NaN logits is nan; results.json
writes them as the strings "inf" and "nan" (JSON has no such numbers; float() reads them back).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .card import SOURCE, json_number
from .errors import DataError, EvaluationError, LongRoPEError
from .factors import FactorSet, baseline_factor_sets
from .needles import (NEEDLE_TASKS, RULER_TASKS, Haystack, ItemTooShort, NeedleItem, build_items, chat_frame,
                      haystack_from_texts, noise_haystack)
from .perplexity import perplexity, token_nll, use_factor_set
from .source import SourceModel

MIN_LENGTH = 2  # one token of context and one to predict
NEEDLE_ANSWERS = "needle_answers.jsonl"


def comparison_sets(checkpoint: FactorSet, baselines: bool) -> dict[str, FactorSet]:
    """The checkpoint's own set first, then the baselines at the same target: the search's (the source's RoPE
    unchanged, "none", and every analytic set composed on it; factors.baseline_factor_sets)."""
    label = "LongRoPE" if checkpoint.is_searched else f"LongRoPE ({checkpoint.method})"
    sets = {label: checkpoint}
    if baselines:
        sets.update(baseline_factor_sets(checkpoint.model, checkpoint.target_length))
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
        raise EvaluationError(f"{{stride}} {stride} must be smaller than the length {length}: windows that do not "
                              "overlap leave the tokens between them unscored", setting="stride", value=stride,
                              bound=length)
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


def perplexity_measurements(sets: dict[str, FactorSet], lengths: list[int]) -> Iterator[tuple[int, str, tuple, bool]]:
    """(length, method, what the model computes with, whether it is computed here) in measuring order: a method
    whose settings at a length equal one measured before reuses its perplexity."""
    seen: set[tuple] = set()
    for length in lengths:
        for name, factor_set in sets.items():
            key = (_effective_settings(factor_set, length), length)
            yield length, name, key, key not in seen
            seen.add(key)


def perplexity_work(sets: dict[str, FactorSet], lengths: list[int], documents: int, protocol: str = "truncated",
                    stride: int = 256) -> list[int]:
    """The tokens each document forward of perplexity_by_length runs through the model, in its order (0 for a
    reused measurement): its progress steps."""
    work = []
    for length, _, _, computed in perplexity_measurements(sets, lengths):
        tokens = length if protocol == "truncated" else sum(
            end - begin for begin, end, _ in sliding_windows(max(lengths), length, stride))
        work += [tokens if computed else 0] * documents
    return work


def perplexity_by_length(model, documents: list[torch.Tensor], sets: dict[str, FactorSet], lengths: list[int],
                         protocol: str = "truncated", stride: int = 256,
                         on_step: Callable[[], None] = lambda: None) -> dict[str, dict[int, float]]:
    """{method: {length: perplexity}} over documents [1, >= max(lengths)] (inf or nan when so); `on_step` after
    each document (perplexity_work's steps)."""
    results: dict[str, dict[int, float]] = {name: {} for name in sets}
    done: dict[tuple, float] = {}
    for length, name, key, computed in perplexity_measurements(sets, lengths):
        if computed:
            use_factor_set(model, sets[name])
            nll = []
            for ids in documents:
                nll.append(token_nll(model, ids[:, :length])[0] if protocol == "truncated"
                           else sliding_window_nll(model, ids, length, stride))
                on_step()
            done[key] = perplexity(torch.cat(nll))
        else:
            for _ in documents:
                on_step()
        results[name][length] = done[key]
    return results


def needle_items(tokenizer, tasks: dict[str, list[int]], depths: list[float], trials: int, seed: int,
                 haystack_texts: Iterable[tuple[str, str]] = (),
                 use_chat_template: bool = True) -> tuple[list[NeedleItem], str | None]:
    """Items for {task: lengths} (needles.build_items: every length, depth and trial; the same items for every
    method), on a haystack of the given (name, text) pairs for the tasks of "data" haystack and on the
    noise filler for the others; and the names of the texts used (None when none was). Raises
    needles.ItemTooShort for a length that cannot hold a task's fixed text and answer."""
    chat = chat_frame(tokenizer, use_chat_template)
    longest = max((length for lengths in tasks.values() for length in lengths), default=0)
    haystacks: dict[str, Haystack] = {}
    items: list[NeedleItem] = []
    for name, lengths in tasks.items():
        task = NEEDLE_TASKS[name]
        if task.haystack not in haystacks:
            haystacks[task.haystack] = (noise_haystack(tokenizer, longest) if task.haystack == "noise"
                                        else haystack_from_texts(tokenizer, haystack_texts, longest))
        items += build_items(tokenizer, task, haystacks[task.haystack], lengths, depths, trials, seed, chat=chat)
    return items, haystacks["data"].name if "data" in haystacks else None


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of the prompts as one batch, left-padded (the shipped model counts each row's
    positions from the attention mask, so each row runs on its own factor set); the new tokens decoded
    without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)  # [batch, width + new]
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def needle_measurements(sets: dict[str, FactorSet], items: list[NeedleItem], lengths: dict[str, dict[str, list[int]]]
                        ) -> Iterator[tuple[str, str, int, list[NeedleItem], tuple, bool]]:
    """(method, task, length, its items, what the model computes with, whether it is computed here) in measuring
    order, for each method's lengths (`lengths`[method][task]): a method whose settings at a length equal one
    measured before reuses its answers."""
    groups: dict[tuple[str, int], list[NeedleItem]] = {}
    for item in items:
        groups.setdefault((item.task, item.length), []).append(item)
    seen: set[tuple] = set()
    for name, factor_set in sets.items():
        for (task, length), group in groups.items():
            if length in lengths[name].get(task, ()):
                key = (_effective_settings(factor_set, length), task, length)
                yield name, task, length, group, key, key not in seen
                seen.add(key)


def needle_work(sets: dict[str, FactorSet], items: list[NeedleItem], lengths: dict[str, dict[str, list[int]]]
                ) -> list[int]:
    """The tokens each needle prompt of needle_accuracy runs through the model (prompt and answer), in its order (0
    for reused answers): its progress steps."""
    return [len(item.input_ids) + NEEDLE_TASKS[task].answer_tokens if computed else 0
            for _, task, _, group, _, computed in needle_measurements(sets, items, lengths) for item in group]


def needle_accuracy(model, tokenizer, sets: dict[str, FactorSet], items: list[NeedleItem],
                    lengths: dict[str, dict[str, list[int]]], batch_size: int = 4,
                    on_step: Callable[[], None] = lambda: None) -> tuple[dict, list[dict]]:
    """{task: {method: {length: {depth: mean score}}}} over the items of each method's lengths
    (`lengths`[method][task]), and every answer ({method, task, length, depth, trial, answers, output,
    score}). Items of one task and length are generated in batches of `batch_size`; a method whose
    settings at a length equal one measured before reuses its answers (inside the original window every
    set that keeps the source's RoPE there)."""
    accuracy: dict[str, dict[str, dict[int, dict[float, float]]]] = {}
    answers: list[dict] = []
    done: dict[tuple, list[str]] = {}
    current = None
    for name, task, length, group, key, computed in needle_measurements(sets, items, lengths):
        if computed:
            if current != name:
                use_factor_set(model, sets[name])
                current = name
            done[key] = []
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                done[key] += generate_batch(model, tokenizer, [item.input_ids for item in batch],
                                            NEEDLE_TASKS[task].answer_tokens)
                for _ in batch:
                    on_step()
        else:
            for _ in group:
                on_step()
        scores: dict[float, list[float]] = {}
        for item, output in zip(group, done[key]):
            score = NEEDLE_TASKS[task].score(output, item.answers)
            scores.setdefault(item.depth, []).append(score)
            answers.append({"method": name, "task": task, "length": length, "depth": item.depth,
                            "trial": item.trial, "answers": item.answers, "output": output, "score": score})
        accuracy.setdefault(task, {}).setdefault(name, {})[length] = {
            depth: sum(values) / len(values) for depth, values in scores.items()}
    return accuracy, answers


@dataclass
class EvaluationPlan:
    """What an evaluation measures, checked and prepared (documents tokenized, needle prompts built) before
    the model is loaded, so bad input fails in a second."""

    source: SourceModel
    sets: dict[str, FactorSet]
    tokenizer: Any
    lengths: list[int]
    protocol: str
    stride: int
    documents: list[torch.Tensor]  # [1, max(lengths)] each
    document_names: list[str]
    skipped_documents: int  # shorter than max(lengths), or empty
    needle_items: list[NeedleItem]
    needle_lengths: dict[str, dict[str, list[int]]]  # {method: {task: lengths}}; SOURCE: its own window only
    needle_sets: dict[str, FactorSet]  # sets, and SOURCE (the source's RoPE) with the baselines
    haystack: str | None  # the texts the haystack was cut from
    depths: list[float]
    trials: int
    seed: int
    batch_size: int
    chat_template: bool  # the prompts are wrapped in the tokenizer's chat template

    @property
    def work(self) -> list[int]:
        """The steps of run_evaluation's `on_step`, each as the tokens it runs through the model (0 when reused):
        a document forward per method and length, then a prompt per method and needle item."""
        return (perplexity_work(self.sets, self.lengths, len(self.documents), self.protocol, self.stride)
                + needle_work(self.needle_sets, self.needle_items, self.needle_lengths))

    @property
    def step_unit(self) -> str:
        """What a step is, in words."""
        return " and ".join(unit for unit, present in (("document forwards", self.documents),
                                                       ("needle prompts", self.needle_items)) if present)


def check_lengths(lengths: list[int], needle_lengths: dict[str, list[int]], target: int, protocol: str,
                  stride: int, beyond_target: bool) -> None:
    """Raise EvaluationError, carrying the setting, the value and the bound, for a length that cannot be
    measured as labelled: below MIN_LENGTH, beyond the checkpoint's target (unless beyond_target), or
    a sliding stride that leaves tokens unscored. `needle_lengths` is {setting: lengths}
    ("passkey_lengths", "needle_lengths")."""
    for setting, values in (("lengths", lengths), *needle_lengths.items()):
        for length in values:
            if length < MIN_LENGTH:
                raise EvaluationError(f"{{{setting}}} {length}: a length is at least {MIN_LENGTH} tokens (context "
                                      "and a token to predict)", setting=setting, value=length, bound=MIN_LENGTH)
            if length > target and not beyond_target:
                raise EvaluationError(f"{{{setting}}} {length} is beyond the checkpoint's target of {target:,} tokens; "
                                      "add {beyond_target} to measure extrapolation", setting=setting, value=length,
                                      bound=target)
    if protocol == "sliding" and lengths:
        for length in lengths:
            sliding_windows(max(lengths), length, stride)


def plan_evaluation(folder: Path, *, data: list[str], lengths: list[int], baselines: bool = True,
                    protocol: str = "truncated", stride: int = 256, documents: int | None = 4,
                    passkey_lengths: list[int] = (), needle_lengths: list[int] = (),
                    needles: list[str] = RULER_TASKS, depths: list[float] = (0.1, 0.5, 0.9), trials: int = 3,
                    seed: int = 0, batch_size: int = 4, chat_template: bool = True, beyond_target: bool = False,
                    out: Path | None = None, status: Callable[[str], None] = lambda message: None) -> EvaluationPlan:
    """Check the request against the checkpoint and prepare its inputs, without loading the model.

    `lengths` (perplexity), `passkey_lengths` and `needle_lengths` (the `needles` tasks, on a haystack of
    `data`) are in tokens (duplicates dropped, sorted); `documents` is the number of documents of at least
    max(lengths) tokens to score, read no further than needed; `out` the results folder run_evaluation
    will replace (checked here). With `baselines`, the needle tasks are also measured for the source at
    its own window (SOURCE). `chat_template`: wrap the needle prompts in the tokenizer's chat template
    when it has one. Raises LongRoPEError for a folder that is not a LongRoPE checkpoint,
    EvaluationError for a length out of bounds (see check_lengths, needle_items), DataError for
    unreadable data or no long-enough document.
    """
    from transformers import AutoTokenizer

    from .checkpoint_files import FACTORS_FILE
    from .documents import read_documents
    from .factors import load_factor_set
    from .perplexity import tokenized_documents
    from .preflight import check_evaluation_inputs
    from .source import read_source

    check_evaluation_inputs(folder, data, out)
    source = read_source(folder)
    if source.longrope is None:
        raise LongRoPEError(f"'{folder}' is not a LongRoPE checkpoint; convert it first with longrope-convert")
    if lengths and not data:
        raise EvaluationError("{lengths} needs {data}: perplexity is measured on documents", setting="data")
    if needle_lengths and not data:
        raise EvaluationError("{needle_lengths} needs {data}: the needle tasks hide their needles in its text",
                              setting="data")
    if data and not (lengths or needle_lengths):
        raise EvaluationError("{data} needs {lengths} (perplexity) or {needle_lengths} (needle tasks)",
                              setting="lengths")
    if not (lengths or passkey_lengths or needle_lengths):
        raise EvaluationError("nothing to evaluate: give {data} with {lengths} or {needle_lengths}, and/or "
                              "{passkey_lengths}", setting="lengths")
    unknown = [name for name in needles if name not in NEEDLE_TASKS]
    if unknown:
        raise EvaluationError(f"{{needles}} {unknown[0]}: no such task (tasks: {', '.join(NEEDLE_TASKS)})",
                              setting="needles", value=unknown[0], bound=list(NEEDLE_TASKS))
    factors_file = source.folder / FACTORS_FILE
    checkpoint = load_factor_set(factors_file) if factors_file.is_file() else source.longrope
    lengths, passkey_lengths, needle_lengths = (sorted(set(values)) for values in
                                                (lengths, passkey_lengths, needle_lengths))
    check_lengths(lengths, {"passkey_lengths": passkey_lengths, "needle_lengths": needle_lengths},
                  checkpoint.target_length, protocol, stride, beyond_target)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    docs, names, skipped = [], [], 0
    if lengths:
        longest = max(lengths)
        docs, names, skipped = tokenized_documents(tokenizer, read_documents(data), longest, documents)
        if not docs:
            raise DataError(f"{{data}} has no document of at least {longest:,} tokens ({skipped} shorter or empty "
                            "ones skipped)", setting="data", bound=longest)
        status(f"perplexity: {len(docs)} documents of {longest:,} tokens ({skipped} shorter or empty ones skipped)")
    sets = comparison_sets(checkpoint, baselines)
    tasks = {**({name: needle_lengths for name in needles} if needle_lengths else {}),
             **({"passkey": passkey_lengths} if passkey_lengths else {})}
    by_method = {name: tasks for name in sets}
    needle_sets = dict(sets)
    window = checkpoint.model.original_max_position_embeddings
    if baselines and tasks:  # the source at its own window: is it able to do the tasks at all?
        needle_sets[SOURCE] = sets["none"]
        by_method[SOURCE] = {name: [window] for name in tasks}
    built = {name: sorted({n for by_task in by_method.values() for n in by_task.get(name, ())}) for name in tasks}
    try:
        items, haystack = needle_items(tokenizer, built, list(depths), trials, seed,
                                       ((document.name, document.text) for document in read_documents(data)),
                                       chat_template)
    except ItemTooShort as error:
        asked = error.length in tasks[error.task]
        setting = ("passkey_lengths" if error.task == "passkey" else "needle_lengths") if asked else "baselines"
        where = (f"{{{setting}}} {error.length} is" if asked
                 else f"the source's own window, {error.length:,} tokens (measured with {{baselines}}), is")
        raise EvaluationError(f"{where} below the smallest {error.task} prompt, {error.needed} tokens with this "
                              f"tokenizer (its text without haystack, and {NEEDLE_TASKS[error.task].answer_tokens} "
                              "answer tokens)", setting=setting, value=error.length, bound=error.needed) from None
    if items:
        status(f"needle tasks: {len(items)} prompts ({', '.join(tasks)}), "
               + ("in the tokenizer's chat template" if chat_frame(tokenizer, chat_template)[0] else "no chat template")
               + (f", haystack from {haystack}" if haystack else ""))
    return EvaluationPlan(source=source, sets=sets, tokenizer=tokenizer, lengths=lengths, protocol=protocol,
                          stride=stride, documents=docs, document_names=names, skipped_documents=skipped,
                          needle_items=items, needle_lengths=by_method, needle_sets=needle_sets, haystack=haystack,
                          depths=list(depths), trials=trials, seed=seed, batch_size=batch_size,
                          chat_template=bool(chat_frame(tokenizer, chat_template)[0]))


def run_evaluation(plan: EvaluationPlan, *, out: Path | None = None, command: str = "",
                   device_map: str | None = None, status: Callable[[str], None] = lambda message: None,
                   on_step: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Measure a plan and write results.json, the needle answers (needle_answers.jsonl) and the plots to
    `out` (default: the checkpoint's eval/ folder), replacing what was there only when all is done;
    `device_map="auto"` spreads the model over the GPUs (perplexity.load_longrope_model). Returns the
    results as written (lengths as int keys; inf and nan as strings)."""
    from .card import EVAL_DIR, EVAL_RESULTS
    from .outputs import atomic_folder
    from .perplexity import load_longrope_model
    from .plots import accuracy_heatmap, factors_plot, perplexity_plot

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
    answers: list[dict] = []
    if plan.needle_items:
        accuracy, answers = needle_accuracy(model, plan.tokenizer, plan.needle_sets, plan.needle_items,
                                            plan.needle_lengths, plan.batch_size, on_step)
        results["needles"] = {
            "depths": plan.depths, "trials": plan.trials, "seed": plan.seed, "chat_template": plan.chat_template,
            "haystack": plan.haystack, "source_window": checkpoint.model.original_max_position_embeddings
            if SOURCE in plan.needle_sets else None,
            "tasks": {task: {"description": NEEDLE_TASKS[task].description,
                             "answer_tokens": NEEDLE_TASKS[task].answer_tokens, "accuracy": by_method}
                      for task, by_method in accuracy.items()}}
    results["settings"] = {"command": command, "device": f"{device}, {str(model.dtype).replace('torch.', '')}",
                           "created": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    out = Path(out) if out is not None else source.folder / EVAL_DIR
    name = Path(source.name).name
    with atomic_folder(out, overwrite=True) as staging:
        (staging / EVAL_RESULTS).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        factors_plot(results["factors"], staging / "factors.png", f"{name}: LongRoPE factors")
        if "perplexity" in results:
            perplexity_plot(results["perplexity"]["perplexity"], staging / "perplexity.png", f"{name}: perplexity")
        for task, measured in results.get("needles", {}).get("tasks", {}).items():
            accuracy_heatmap(measured["accuracy"], staging / f"{task}.png", f"{name}: {task}")
        if answers:
            (staging / NEEDLE_ANSWERS).write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    return results
