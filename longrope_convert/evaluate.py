"""Evaluation of an extended checkpoint: perplexity against length and passkey retrieval, for the
checkpoint's factors and, on the same weights, the classic methods at the same target.

Perplexity protocols:
  truncated  each document: BOS + its first L - 1 tokens, as in the search; the documents are those
             long enough for the largest length, so every column scores the same documents
  sliding    each document's first T tokens (T = the largest length), windows of L tokens moved by
             a stride S; every token is scored once, with the context its window gives (YaRN paper)
Baselines are factor sets on the same model (no scaling, PI, NTK, YaRN): like LongRoPE, they use
the source's RoPE up to the original window and their own factors beyond it.

Passkey retrieval: filler sentences with a 5-digit key at a chosen depth, then "What is the pass
key?", greedy decoding; accuracy over N trials per length x depth with a fixed seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .factors import FactorSet, analytic_factor_set
from .perplexity import Document, document_ids, perplexity, token_nll, tokenized_documents, use_factor_set

BASELINE_METHODS = ("none", "pi", "ntk", "yarn")


def comparison_sets(checkpoint: FactorSet, baselines: bool) -> dict[str, FactorSet]:
    """The checkpoint's own set first, then the baselines at the same target."""
    label = "LongRoPE" if checkpoint.is_searched else f"LongRoPE ({checkpoint.method})"
    sets = {label: checkpoint}
    if baselines:
        half = len(checkpoint.long_factor)
        sets["none"] = replace(checkpoint, long_factor=[1.0] * half, short_factor=[1.0] * half, n_hat=0,
                               long_mscale=1.0, short_mscale=1.0)
        for method in BASELINE_METHODS[1:]:
            sets[method] = analytic_factor_set(method, checkpoint.model, checkpoint.target_length)
    return sets


def _effective_settings(factor_set: FactorSet, length: int) -> tuple:
    """What the model computes with at this length: identical settings give identical results."""
    if length <= factor_set.model.original_max_position_embeddings:
        return ("short", tuple(factor_set.short_factor), factor_set.short_mscale, factor_set.n_hat)
    return ("long", tuple(factor_set.long_factor), factor_set.long_mscale, factor_set.n_hat)


def sliding_window_nll(model, input_ids: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    """NLL [n - 1] of every token after the first, each scored once in a window of at most `length`."""
    total = input_ids.shape[1]
    scored, pieces = 1, []  # targets 1 .. scored - 1 are done
    for begin in range(0, total, stride):
        end = min(begin + length, total)
        nll = token_nll(model, input_ids[:, begin:end])[0]  # targets begin + 1 .. end - 1
        pieces.append(nll[scored - (begin + 1):])
        scored = end
        if end == total:
            break
    return torch.cat(pieces)


def perplexity_by_length(model, tokenizer, documents: list[Document], sets: dict[str, FactorSet],
                         lengths: list[int], protocol: str = "truncated", stride: int = 256,
                         limit: int | None = None, on_step: Callable[[], None] = lambda: None) -> dict:
    """{"documents": [...], "perplexity": {method: {length: ppl}}} for the documents long enough."""
    longest = max(lengths)
    docs, names, skipped = tokenized_documents(tokenizer, documents, longest, limit)
    results: dict[str, dict[int, float]] = {name: {} for name in sets}
    done: dict[tuple, float] = {}
    for length in lengths:
        for name, factor_set in sets.items():
            key = (_effective_settings(factor_set, length), length)
            if key not in done:
                use_factor_set(model, factor_set)
                if protocol == "truncated":
                    nll = torch.cat([token_nll(model, ids[:, :length])[0] for ids in docs])
                else:
                    nll = torch.cat([sliding_window_nll(model, ids, length, stride) for ids in docs])
                done[key] = perplexity(nll)
            results[name][length] = done[key]
            on_step()
    return {"documents": names, "skipped_documents": skipped, "protocol": protocol,
            "stride": stride if protocol == "sliding" else None, "perplexity": results}


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_ANSWER_TOKENS = 10


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[torch.Tensor, int]:
    """Token ids [1, ~length] of the standard passkey prompt with the key after `depth` of the filler,
    and the index of the token where the key sentence starts."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fixed = count(PASSKEY_INTRO) + count(PASSKEY_LINE.format(key=key)) + count(PASSKEY_QUESTION) + 1  # + BOS
    repeats = max(0, round((length - fixed) / count(PASSKEY_FILLER * 8) * 8))
    before = round(repeats * depth)
    head = PASSKEY_INTRO + PASSKEY_FILLER * before
    text = head + PASSKEY_LINE.format(key=key) + PASSKEY_FILLER * (repeats - before) + PASSKEY_QUESTION
    ids = document_ids(tokenizer, text)
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    key_at = next(i for i, (_, end) in enumerate(spans) if end > len(head)) + ids.shape[1] - len(spans)
    return ids, key_at


def read_passkey(generated: str) -> str | None:
    """The number the model answered, with separators inside it dropped ("12 345", "12,345.", "**12345**")."""
    match = re.search(r"\d(?:[\d,\s]*\d)?", generated)
    return re.sub(r"\D", "", match.group(0)) if match else None


@torch.inference_mode()
def passkey_accuracy(model, tokenizer, sets: dict[str, FactorSet], lengths: list[int], depths: list[float],
                     trials: int, seed: int = 0, on_step: Callable[[], None] = lambda: None) -> dict:
    """{method: {length: {depth: accuracy}}}; the same keys for every method."""
    rng = random.Random(seed)
    keys = {(length, depth, trial): f"{rng.randint(10000, 99999)}"
            for length in lengths for depth in depths for trial in range(trials)}
    results: dict[str, dict[int, dict[float, float]]] = {name: {} for name in sets}
    done: dict[tuple, float] = {}
    for name, factor_set in sets.items():
        use_factor_set(model, factor_set)
        for length in lengths:
            results[name][length] = {}
            for depth in depths:
                settings = (_effective_settings(factor_set, length), length, depth)
                if settings not in done:
                    correct = 0
                    for trial in range(trials):
                        key = keys[(length, depth, trial)]
                        # prompt and answer together fill the length evaluated
                        ids, _ = passkey_prompt(tokenizer, length - PASSKEY_ANSWER_TOKENS, depth, key)
                        out = model.generate(ids.to(model.device), max_new_tokens=PASSKEY_ANSWER_TOKENS,
                                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
                        correct += read_passkey(tokenizer.decode(out[0, ids.shape[1]:])) == key
                        on_step()
                    done[settings] = correct / trials
                else:
                    for _ in range(trials):
                        on_step()
                results[name][length][depth] = done[settings]
    return results


def evaluate_checkpoint(folder: Path, data: list[str], lengths: list[int], baselines: bool = True,
                        protocol: str = "truncated", stride: int = 256, documents: int | None = 4,
                        passkey_lengths: list[int] = (), depths: list[float] = (0.1, 0.5, 0.9), trials: int = 3,
                        seed: int = 0, out: Path | None = None, command: str = "",
                        status: Callable[[str], None] = lambda message: None,
                        on_step: Callable[[], None] = lambda: None, device_map: str | None = None) -> dict:
    """Run the evaluation of a converted checkpoint and write results.json and the plots to `out`
    (default: the checkpoint's eval/ folder), replacing what was there only when all is done."""
    from transformers import AutoTokenizer

    from .card import EVAL_DIR, EVAL_RESULTS
    from .convert import atomic_folder
    from .errors import LongRoPEError
    from .factors import FACTORS_FILE, load_factor_set
    from .perplexity import load_longrope_model, read_documents
    from .plots import factors_plot, passkey_heatmap, perplexity_plot
    from .source import read_source

    source = read_source(folder)
    if source.longrope is None:
        raise LongRoPEError(f"'{folder}' is not a LongRoPE checkpoint; convert it first with longrope-convert")
    factors_file = source.folder / FACTORS_FILE
    checkpoint = load_factor_set(factors_file) if factors_file.is_file() else source.longrope
    if not data and not passkey_lengths:
        raise LongRoPEError("nothing to evaluate: give --data with --lengths, and/or --passkey-lengths")
    sets = comparison_sets(checkpoint, baselines)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status(f"model: loading {source.folder} on {device}")
    model = load_longrope_model(source.folder, source.config, device, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    results: dict[str, Any] = {"checkpoint": source.name, "target_length": checkpoint.target_length,
                               "original_max_position_embeddings": checkpoint.model.original_max_position_embeddings,
                               "factors": {name: s.long_factor for name, s in sets.items()}}
    if data:
        results["perplexity"] = perplexity_by_length(model, tokenizer, read_documents(data), sets, lengths, protocol,
                                                     stride, documents, on_step=on_step)
        if not results["perplexity"]["documents"]:
            raise LongRoPEError(f"--data has no document of at least {max(lengths)} tokens")
    if passkey_lengths:
        results["passkey"] = {"trials": trials, "depths": list(depths), "seed": seed, "accuracy": passkey_accuracy(
            model, tokenizer, sets, list(passkey_lengths), list(depths), trials, seed, on_step=on_step)}
    results["settings"] = {"command": command, "device": f"{device}, {str(model.dtype).replace('torch.', '')}",
                           "created": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    out = Path(out) if out is not None else source.folder / EVAL_DIR
    name = Path(source.name).name
    with atomic_folder(out, overwrite=True) as staging:
        (staging / EVAL_RESULTS).write_text(json.dumps(results, indent=2) + "\n")
        factors_plot(results["factors"], staging / "factors.png", f"{name}: LongRoPE factors")
        if "perplexity" in results:
            perplexity_plot(results["perplexity"]["perplexity"], staging / "perplexity.png", f"{name}: perplexity")
        if "passkey" in results:
            passkey_heatmap(results["passkey"]["accuracy"], staging / "passkey.png", f"{name}: passkey retrieval")
    return results
