"""The model card (README.md) of a converted checkpoint: Hub metadata, how to load it, where the
factors come from, and the evaluation when one was run (eval/results.json next to it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .factors import FACTORS_FILE, FactorSet, load_factor_set
from .outputs import read_marker, write_text_atomically

CARD_FILE = "README.md"
EVAL_DIR = "eval"
EVAL_RESULTS = "results.json"
LICENSE_KEYS = ("license", "license_name", "license_link")


def front_matter(card_text: str) -> dict[str, Any]:
    """The YAML metadata block of a model card ({} when there is none or it does not parse)."""
    if not card_text.startswith("---"):
        return {}
    block = card_text[3:].split("\n---", 1)[0]
    try:
        metadata = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def source_license(card_text: str | None) -> dict[str, Any]:
    """License fields of the source's own model card (its text, None if it has none), inherited by the
    converted checkpoint."""
    metadata = front_matter(card_text) if card_text else {}
    return {key: metadata[key] for key in LICENSE_KEYS if key in metadata}


def model_card(factor_set: FactorSet, base_model: str, license_fields: dict[str, Any], repo: str,
               revision: str | None = None, evaluation: dict[str, Any] | None = None,
               changes: Sequence[dict[str, Any]] = ()) -> str:
    """The card's text; `changes` ({"file", "field", "from", "to"}) lists the source's fields that
    conversion set to the new window."""
    metadata = {"base_model": base_model, **license_fields, "library_name": "transformers",
                "pipeline_tag": "text-generation", "tags": ["longrope", "long-context", "llama"]}
    original = factor_set.model.original_max_position_embeddings
    target = factor_set.target_length
    revision_argument = f', revision="{revision}"' if revision else ""
    sections = [
        "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n",
        f"# {Path(repo).name}\n",
        f"`{base_model}` with its context window extended from {original:,} to {target:,} tokens "
        f"({factor_set.scale:g}x) by [LongRoPE](https://arxiv.org/abs/2402.13753), without fine-tuning. Made "
        f"with longrope-convert {__version__}; the weights are the source's, unchanged.\n",
        _factors_section(factor_set, plotted=evaluation is not None),
        "## How to load\n",
        "With the shipped modeling code (`trust_remote_code=True`), the exact LongRoPE model:\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True{revision_argument})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}"{revision_argument})\n```\n',
        "- inputs within the original window give the source model's logits bit for bit;\n"
        f"- the first n̂ = {factor_set.n_hat} positions keep their original rotary angles;\n"
        "- each sequence of a batch uses the short or the long factors according to its own length;\n"
        "- cached generation that crosses the original window rebuilds the cache once with the long factors, so "
        "it equals a full recompute without cache (DynamicCache and StaticCache).\n",
        "Without remote code, stock transformers 5.x and vLLM read the standard `longrope` `rope_scaling` of "
        "`config.json` and run the model as a plain Llama with LongRoPE scaling. What differs: no n̂; the long "
        f"attention factor ({factor_set.long_mscale:.4f}) is applied to short inputs too, so they are not exactly "
        "the source model; cached generation keeps short-factor keys and values after crossing the window.\n",
    ]
    if changes:
        sections.append(_changes_section(changes))
    if evaluation:
        sections.append(_evaluation_section(evaluation, original))
    return "\n".join(sections)


def _changes_section(changes: Sequence[dict[str, Any]]) -> str:
    lines = "".join(f"- `{c['file']}`: `{c['field']}` {c['from']:,} → {c['to']:,}\n" for c in changes)
    return ("## Changes from the base model\n\nThe weights are the base model's, unchanged. Every field that stated "
            f"its context window now states the new one:\n\n{lines}\n`config.json` also gains the LongRoPE "
            "`rope_scaling`, the `longrope` settings and `auto_map`; `modeling_longrope_llama.py` and "
            "`longrope_factors.json` are added.\n")


def _factors_section(factor_set: FactorSet, plotted: bool) -> str:
    provenance = factor_set.provenance
    if factor_set.is_searched:
        how = (f"Factors **searched** (`{factor_set.method}`) by evolution on long-document perplexity at "
               f"{provenance.get('eval_length', factor_set.target_length):,} tokens.")
    else:
        how = (f"Factors **not searched**: `{factor_set.method}`, an analytic initialisation. Searched factors "
               "usually give lower perplexity; run `longrope-convert search` to get them.")
    rows = [("method", factor_set.method), ("n̂", factor_set.n_hat),
            ("long mscale", f"{factor_set.long_mscale:.4f}"), ("short mscale", f"{factor_set.short_mscale:.4f}")]
    for key in ("data", "documents", "eval_length", "evaluations", "best_perplexity", "baseline_perplexities",
                "preset", "budget", "seed", "base_factors", "tool_version", "created"):
        if key in provenance:
            value = provenance[key]
            if key == "base_factors":
                value = {k: v for k, v in value.items() if k != "long_factor"}
            rows.append((key, json.dumps(value) if isinstance(value, (dict, list)) else value))
    table = "| | |\n|---|---|\n" + "".join(f"| {key} | {value} |\n" for key, value in rows)
    plot = "λ per frequency dimension against the classic methods: ![factors](eval/factors.png)\n" if plotted else ""
    return f"## Factors\n\n{how} The full factor set is in `longrope_factors.json`.\n\n{table}\n{plot}"


def _evaluation_section(evaluation: dict[str, Any], original: int) -> str:
    lines = ["## Evaluation\n"]
    ppl = evaluation.get("perplexity")
    if ppl:
        protocol = ppl["protocol"] + (f", stride {ppl['stride']}" if ppl.get("stride") else "")
        lines.append(f"Perplexity ({protocol}) on {len(ppl['documents'])} documents "
                     f"({', '.join(Path(name).name for name in ppl['documents'][:4])}"
                     f"{', ...' if len(ppl['documents']) > 4 else ''}); lower is better. Up to {original:,} tokens "
                     "every method runs the source's RoPE.\n")
        lines += perplexity_table(ppl["perplexity"])
        lines.append("\n![perplexity](eval/perplexity.png)\n")
    passkey = evaluation.get("passkey")
    if passkey:
        lines.append(f"Passkey retrieval: accuracy over {passkey['trials']} trial(s) per length and depth "
                     f"(depths {', '.join(f'{d:.0%}' for d in passkey['depths'])}), greedy decoding.\n")
        lines += passkey_table(passkey["accuracy"])
        lines.append("\n![passkey](eval/passkey.png)\n")
    settings = evaluation.get("settings")
    if settings:
        lines.append(f"Measured with `{settings['command']}` ({settings['device']}, {settings['created']}).\n")
    return "\n".join(lines)


def perplexity_table(perplexity: dict[str, dict[str, float]], corner: str = "method") -> list[str]:
    """Markdown rows of {method: {length: perplexity}} as in results.json (lengths as strings)."""
    return _by_length_table(perplexity, corner, "{:.3f}".format)


def passkey_table(accuracy: dict[str, dict[str, dict[str, float]]], corner: str = "method") -> list[str]:
    """Markdown rows of {method: {length: {depth: accuracy}}}, averaged over the depths."""
    means = {method: {n: sum(by_depth.values()) / len(by_depth) for n, by_depth in by_length.items()}
             for method, by_length in accuracy.items()}
    return _by_length_table(means, corner, "{:.0%}".format)


def _by_length_table(values: dict[str, dict[str, float]], corner: str, cell: Callable[[float], str]) -> list[str]:
    lengths = sorted({int(n) for by_length in values.values() for n in by_length})
    lines = [f"| {corner} | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for method, by_length in values.items():
        lines.append(f"| {method} | " + " | ".join(cell(by_length[str(n)]) if str(n) in by_length else ""
                                                   for n in lengths) + " |")
    return lines


def read_evaluation(folder: Path) -> dict[str, Any] | None:
    path = folder / EVAL_DIR / EVAL_RESULTS
    return json.loads(path.read_text()) if path.is_file() else None


def refresh_card(folder: Path, repo: str | None = None, revision: str | None = None) -> str:
    """Rewrite a converted checkpoint's README.md from its factor file and eval/results.json, keeping
    the base model and licence its card already names."""
    card = folder / CARD_FILE
    existing = front_matter(card.read_text()) if card.is_file() else {}
    factor_set = load_factor_set(folder / FACTORS_FILE)
    text = model_card(factor_set, base_model=existing.get("base_model") or factor_set.model.name,
                      license_fields={key: existing[key] for key in LICENSE_KEYS if key in existing},
                      repo=repo or str(folder), revision=revision, evaluation=read_evaluation(folder),
                      changes=(read_marker(folder) or {}).get("changes", []))
    write_text_atomically(card, text)
    return text
