"""The model card (README.md) of a converted checkpoint: Hub metadata, how to load it, where the
factors come from, and the evaluation when one was run (eval/results.json next to it).

The card belongs to the user once written. The tool owns only the sections it writes, each between
two HTML comments (invisible on the Hub):

    <!-- longrope-convert:begin NAME -->
    ...
    <!-- longrope-convert:end NAME -->

Refreshing a card (`eval --card`, a push) rewrites those sections and nothing else: the front matter
(language, datasets, licence, ...) and the user's own sections stay as they are. Cards written before
the markers existed are read by their headings (the title, "## Factors", "## How to load",
"## Evaluation").
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .checkpoint_files import CARD_FILE, EVAL_DIR, FACTORS_FILE, has_tokenizer
from .documents import TEXT_SUFFIXES
from .factors import FactorSet, load_factor_set, provenance_count
from .hub import REPO_ID
from .outputs import read_marker, write_text_atomically
from .source import VLLM_WINDOW_KEYS

EVAL_RESULTS = "results.json"
LICENSE_KEYS = ("license", "license_name", "license_link")
SECTIONS = ("summary", "factors", "usage", "changes", "evaluation")  # in card order
LEGACY_SIGNATURE = "by [LongRoPE](https://arxiv.org/abs/2402.13753), without fine-tuning."  # in every summary
LEGACY_HEADINGS = {"## Factors": "factors", "## How to load": "usage", "## Evaluation": "evaluation"}
MARKED_SECTION = re.compile(r"<!-- longrope-convert:begin (?P<name>\w+)(?: (?P<attributes>\{.*?\}))? -->\n"
                            r".*?<!-- longrope-convert:end (?P=name) -->\n?", re.S)
LEGACY_SNIPPET = re.compile(r'AutoModelForCausalLM\.from_pretrained\("(?P<repo>[^"]+)", trust_remote_code=True'
                            r'(?:, revision="(?P<revision>[^"]+)")?\)')
# The transformers releases the shipped modeling code runs on (its MIN_TRANSFORMERS; setup.cfg says the same).
LOADING_REQUIREMENT = "transformers>=5.3,<6"
SOURCE = "source"  # the needle tasks' row of the source model at its own window (results.json)


def front_matter(card_text: str) -> dict[str, Any]:
    """The YAML metadata block of a model card ({} when there is none or it does not parse)."""
    block = _split_front_matter(card_text)[0]
    try:
        metadata = yaml.safe_load(block[3:].split("\n---", 1)[0]) if block else None
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _split_front_matter(card_text: str) -> tuple[str, str]:
    """(the front matter block with its --- lines, the body); ("", text) when there is none."""
    match = re.match(r"---\n(?:.*?\n)?---[ \t]*(?:\n|$)", card_text, re.S)
    return (match.group(0), card_text[match.end():]) if match else ("", card_text)


def source_license(card_text: str | None) -> dict[str, Any]:
    """License fields of the source's own model card (its text, None if it has none), inherited by the
    converted checkpoint."""
    metadata = front_matter(card_text) if card_text else {}
    return {key: metadata[key] for key in LICENSE_KEYS if key in metadata}


def hub_model_id(folder: Path) -> str | None:
    """The Hub repo id of a snapshot folder of huggingface_hub's cache (.../models--org--name/snapshots/
    <commit> -> "org/name"), else None: a local folder's name is no id the Hub accepts as base_model."""
    folder = Path(folder).resolve()
    cached = folder.parent.parent.name
    if folder.parent.name == "snapshots" and cached.startswith("models--"):
        return cached[len("models--"):].replace("--", "/")  # repo ids never contain "--"
    return None


def model_card(factor_set: FactorSet, base_model: str | None, license_fields: dict[str, Any], repo: str,
               revision: str | None = None, evaluation: dict[str, Any] | None = None,
               changes: Sequence[dict[str, Any]] = (), config: dict[str, Any] | None = None,
               tokenizer: bool = True) -> str:
    """The model card of a converted checkpoint.

    base_model: the source's Hub repo id, or None for a source that has none (then omitted from the
    metadata, which the Hub would refuse). repo and revision: what the loading snippet loads (a Hub id
    or a folder; a branch, tag or commit, or None for main). evaluation: results.json, or None.
    changes: the source's fields conversion set to the new window ({"file", "field", "from", "to"}).
    config: the checkpoint's config.json, whose other window keys the card names (vllm_window_limits).
    tokenizer: whether the checkpoint has tokenizer files (checkpoint_files.has_tokenizer); the loading
    snippet loads a tokenizer only then.
    """
    sections = _sections(factor_set, base_model, repo, revision, evaluation, changes, config, tokenizer)
    return _metadata_block(base_model, license_fields) + "\n" + "\n".join(sections.values())


def _metadata_block(base_model: str | None, license_fields: dict[str, Any]) -> str:
    metadata = {**({"base_model": base_model} if base_model else {}), **license_fields,
                "library_name": "transformers", "pipeline_tag": "text-generation",
                "tags": ["longrope", "long-context", "llama"]}
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n"


def _sections(factor_set: FactorSet, base_model: str | None, repo: str, revision: str | None,
              evaluation: dict[str, Any] | None, changes: Sequence[dict[str, Any]] = (),
              config: dict[str, Any] | None = None, tokenizer: bool = True) -> dict[str, str]:
    """The tool's sections, each wrapped in its markers, in card order."""
    original = factor_set.model.original_max_position_embeddings
    summary = (f"# {Path(repo).name}\n\n"
               f"`{base_model or factor_set.model.name}` with its context window extended from {original:,} to "
               f"{factor_set.target_length:,} tokens ({factor_set.scale:g}x) by "
               f"[LongRoPE](https://arxiv.org/abs/2402.13753), without fine-tuning. Made with longrope-convert "
               f"{__version__}; the weights are the source's, unchanged.\n")
    sections = {"summary": summary, "factors": _factors_section(factor_set, plotted=evaluation is not None),
                "usage": _usage_section(factor_set, repo, revision, config or {}, tokenizer)}
    if changes:
        sections["changes"] = _changes_section(changes)
    if evaluation:
        sections["evaluation"] = _evaluation_section(evaluation, original)
    attributes = {"usage": {"repo": repo, **({"revision": revision} if revision else {})}}
    return {name: _marked(name, text, attributes.get(name)) for name, text in sections.items()}


def _marked(name: str, text: str, attributes: dict[str, Any] | None = None) -> str:
    extra = f" {json.dumps(attributes)}" if attributes else ""
    return f"<!-- longrope-convert:begin {name}{extra} -->\n{text}<!-- longrope-convert:end {name} -->\n"


def vllm_window_limits(config: dict[str, Any]) -> dict[str, int]:
    """The keys of a converted config.json, besides max_position_embeddings, that make vLLM serve less than it:
    vLLM takes the smallest of VLLM_WINDOW_KEYS as the model's window, or model_max_length when the config has it;
    conversion raises only those that stated the source's window."""
    window = config.get("max_position_embeddings")
    keys = ["model_max_length"] if config.get("model_max_length") else VLLM_WINDOW_KEYS[1:]
    return {key: config[key] for key in keys
            if type(config.get(key)) is int and type(window) is int and config[key] < window}


def loading_code(repo: str, revision: str | None, tokenizer: bool) -> str:
    """The Python that loads a converted checkpoint with the shipped modeling code, and its tokenizer when it
    has one (else AutoTokenizer could not load it)."""
    revision_argument = f', revision="{revision}"' if revision else ""
    return (f"from transformers import AutoModelForCausalLM{', AutoTokenizer' if tokenizer else ''}\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True{revision_argument})\n'
            + (f'tokenizer = AutoTokenizer.from_pretrained("{repo}"{revision_argument})\n' if tokenizer else ""))


def _usage_section(factor_set: FactorSet, repo: str, revision: str | None, config: dict[str, Any],
                   tokenizer: bool = True) -> str:
    return (
        "## How to load\n\n"
        f"With the shipped modeling code (`trust_remote_code=True`, `{LOADING_REQUIREMENT}`; an older release stops "
        "at load with one line naming the minimum), the exact LongRoPE model:\n\n"
        f"```python\n{loading_code(repo, revision, tokenizer)}```\n\n"
        + ("" if tokenizer else "The checkpoint has no tokenizer files (its source had none): load the tokenizer "
           "of the model it was made from.\n\n")
        + ("- inputs within the original window give the source model's logits bit for bit, in float32, bfloat16 "
           "and float16 (the rotary math is float32 in every dtype);\n"
           if factor_set.keeps_source_inside_window else
           "- inputs within the original window use this checkpoint's own short factors, not the source's RoPE "
           "(`longrope_factors.json`);\n") +
        f"- the first n̂ = {factor_set.n_hat} positions keep their original rotary angles{_n_hat_scale(factor_set)};\n"
        "- each sequence of a batch uses the short or the long factors according to its own length;\n"
        "- cached generation that crosses the original window rebuilds the cache once with the long factors, so "
        "every cached step equals a forward without cache, to float rounding as with a stock Llama's own cache "
        "(DynamicCache and StaticCache; greedy, sampling, beam search, assisted decoding, prompt lookup, "
        "`inputs_embeds`, manual loops).\n\n"
        "Without remote code, stock transformers (5.x, 4.57) and vLLM read the standard `longrope` `rope_scaling` of "
        "`config.json` and run the model as a plain Llama with LongRoPE scaling, with the same factors and attention "
        f"factor ({factor_set.long_mscale:.4f}). What differs: no n̂; "
        + ("" if factor_set.long_mscale == 1.0 else
           "the attention factor is applied to short inputs too, so they are not exactly the source model; ")
        + "cached generation keeps short-factor keys and values after "
        "crossing the window; transformers 4.45 uses the long factors at every length.\n\n"
        + _vllm_text(factor_set, repo, config))


def _vllm_text(factor_set: FactorSet, repo: str, config: dict[str, Any]) -> str:
    """What `vllm serve` gives by default and with --max-model-len (see README's reader table), and why loading
    logs a line about `short_mscale` / `long_mscale` when the config carries them."""
    original, target = factor_set.model.original_max_position_embeddings, factor_set.target_length
    text = (f"**vLLM** picks one factor set per server. `vllm serve {repo}` serves {original:,} tokens, the original "
            "window: vLLM's default `max_model_len` for a `longrope` model is the top-level "
            "`original_max_position_embeddings` (kept in `config.json` because stock transformers 4.48-4.57 switch to "
            "the long factors only with it), and within it requests use the short factors. "
            f"`vllm serve {repo} --max-model-len {target}` serves the whole window, with the long factors for every "
            "request, short ones included.")
    window_limits = vllm_window_limits(config)
    if window_limits:
        listed = ", ".join(f"`{key}` ({value:,})" for key, value in window_limits.items())
        text += (f" `config.json` also states a shorter window under {listed}, kept as the source had it (it was not "
                 f"the source's window); vLLM serves at most the smallest of these, so `--max-model-len {target}` needs "
                 "it raised first.")
    if "long_mscale" in (config.get("rope_scaling") or {}):
        text += ("\n\nLoading this checkpoint logs `Unrecognized keys in rope_parameters for 'rope_type'='longrope': "
                 "{'long_mscale', 'short_mscale'}`: the two keys are for vLLM, which reads the attention factor only "
                 "from them (this set's is not vLLM's default); transformers does not use them and loads the model as "
                 "described.")
    return text + "\n"


def _n_hat_scale(factor_set: FactorSet) -> str:
    """How the first n_hat positions are scaled in long inputs (`longrope.n_hat_mscale`), when there are any."""
    if not factor_set.n_hat:
        return ""
    if factor_set.n_hat_mscale == "short":
        return f", with the short attention scale ({factor_set.short_mscale:.4f})"
    return f", with the long attention scale ({factor_set.long_mscale:.4f}) in long inputs"


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
    elif factor_set.method.startswith("search"):
        how = (f"Factors from a search that ran no evolution step (`{factor_set.method}`): **not searched by "
               "evolution**.")
    elif factor_set.method.startswith("baseline:"):
        how = (f"Factors **not searched**: `{factor_set.method}`, an analytic set that the search measured better than "
               "every candidate it scored, so it wrote that set instead.")
    else:
        how = (f"Factors **not searched**: `{factor_set.method}`, an analytic initialisation. Searched factors "
               "usually give lower perplexity; run `longrope-convert search` to get them.")
    if provenance.get("warning"):
        how += f"\n\n**Warning:** {provenance['warning']}\n\n"
    else:
        how += " "
    rows = [("method", factor_set.method), ("n̂", factor_set.n_hat),
            ("long mscale", f"{factor_set.long_mscale:.4f}"), ("short mscale", f"{factor_set.short_mscale:.4f}")]
    composition = provenance.get("composition")
    if composition:
        how += _composition_text(factor_set, composition)
        rows += _composition_rows(factor_set, composition)
    needle_fitness = (provenance.get("objective") or {}).get("name") == "needle"  # the fitness: answer tokens only
    for key in ("data", "documents", "eval_length", "objective", "evaluations", "best_perplexity",
                "baseline_perplexities", "preset", "budget", "seed", "base_factors", "tool_version", "created"):
        if key in provenance:
            measured_on_answers = key in ("best_perplexity", "baseline_perplexities") and needle_fitness
            label = f"{key} (answer tokens)" if measured_on_answers else key
            rows.append((label, _provenance_text(key, provenance[key])))
    table = "| | |\n|---|---|\n" + "".join(f"| {key} | {value} |\n" for key, value in rows)
    plot = "\nλ per frequency dimension against the classic methods: ![factors](eval/factors.png)\n" if plotted else ""
    return f"## Factors\n\n{how}The full factor set is in `longrope_factors.json`.\n\n{table}{plot}"


def _provenance_text(key: str, value: Any) -> str:
    """A provenance field as a card's table shows it: data by name (a short hash; the full one is in the factor
    file), counts as integers when whole, objects as JSON."""
    if key == "data" and isinstance(value, list):
        return ", ".join(_data_text(entry) for entry in value)
    if key == "objective" and isinstance(value, dict) and "answer_tokens" in value:
        items = (f"answer-token perplexity of {len(value['answer_tokens'])} {value.get('task')} items "
                 f"({sum(value['answer_tokens'])} answer tokens)")
        if value.get("name") == "needle":
            return f"needle: {items}"
        return f"{value.get('name')}: perplexity, its {len(value.get('ranked', []))} fittest ranked on the {items}"
    if key == "evaluations" and isinstance(value, (int, float)):
        return f"{provenance_count(value):g}"
    if key == "base_factors" and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "long_factor"}
    if key == "budget" and isinstance(value, dict) and isinstance(value.get("max_evals"), (int, float)):
        value = {**value, "max_evals": provenance_count(value["max_evals"])}
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _data_text(entry: Any) -> str:
    """One --data entry of a factor file: `name` (sha256 prefix), or the dataset id; a path (in files written
    before data_provenance) by its last part."""
    if isinstance(entry, dict) and "dataset" in entry:
        return f"`{entry['dataset']}`"
    if isinstance(entry, dict) and "name" in entry:
        files = f", {entry['files']} files" if "files" in entry else ""
        return f"`{entry['name']}` ({files[2:] + ', ' if files else ''}sha256 `{str(entry.get('sha256', ''))[:12]}`)"
    entry = str(entry)
    dataset_id = entry.partition(":")[0]
    path_like = REPO_ID.fullmatch(dataset_id) is None or Path(dataset_id).suffix in TEXT_SUFFIXES
    return f"`{Path(entry).name if path_like else entry}`"


def _composition_text(factor_set: FactorSet, composition: dict[str, Any]) -> str:
    reach, target = composition["extends"]
    inside = ("is the source bit for bit" if factor_set.keeps_source_inside_window
              else "uses this checkpoint's own short factors")
    return (f"The source already scales RoPE (`{composition['base']}`, up to {reach:,} tokens): the factors compose "
            f"with it. Inside its original window of {factor_set.model.original_max_position_embeddings:,} tokens the "
            f"model {inside}; beyond it, each long factor is the source's own times a new one for the extension to "
            f"{target:,} tokens. ")


def _composition_rows(factor_set: FactorSet, composition: dict[str, Any]) -> list[tuple[str, str]]:
    """The source's own scaling and how the factors compose with it (factors.compose)."""
    rope_scaling = factor_set.model.rope_scaling
    shown = [key for key in rope_scaling if key not in ("rope_type", "short_factor", "long_factor", "source_rope")]
    settings = ", ".join(f"{key} {rope_scaling[key]}" for key in shown)  # factor lists: in the factor file
    reach, target = composition["extends"]
    short_set = "the source's" if factor_set.keeps_source_inside_window else "this checkpoint's own"
    rows = [("source RoPE", f"`{rope_scaling['rope_type']}` ({settings})"),
            ("composition", f"long λ = source λ × new λ, {reach:,} → {target:,} tokens (×{target / reach:g}); "
                            f"short set: {short_set}"),
            ("attention scale", composition.get("attention_scale", ""))]
    measured = composition.get("attention_scales")
    if measured:
        rows.append(("attention scales measured", "; ".join(
            f"{rule}: {scale['long_mscale']:.4f} (perplexity {scale['perplexity']})"
            for rule, scale in measured.items())))
    return rows


def _haystack_names(haystack: str) -> str:
    """The haystack's texts (needles.haystack_from_texts's names, comma-separated) by file name: no path of the
    machine that measured them."""
    return ", ".join(Path(name).name for name in haystack.split(", "))


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
        values = [float(v) for by_length in ppl["perplexity"].values() for v in by_length.values()]
        if not all(math.isfinite(v) for v in values):
            lines.append("\ninf: the perplexity overflows a double (mean NLL above 709.78 nats); nan: the model's "
                         "outputs were not numbers.")
        lines.append("\n![perplexity](eval/perplexity.png)\n")
    needles = evaluation.get("needles")
    if needles:
        lines += _needles_lines(needles)
    settings = evaluation.get("settings")
    if settings:
        lines.append(f"Measured with `{settings['command']}` ({settings['device']}, {settings['created']}).\n")
    return "\n".join(lines)


def perplexity_table(perplexity: dict[str, dict[str, float | str]], corner: str = "method") -> list[str]:
    """Markdown rows of {method: {length: perplexity}} as in results.json (lengths as strings; inf and
    nan as strings too)."""
    return _by_length_table(perplexity, corner, lambda value: f"{float(value):.3f}")


def _needles_lines(needles: dict[str, Any]) -> list[str]:
    tasks = needles["tasks"]
    ruler = [task for task in tasks if task != "passkey"]
    template = {True: "in the tokenizer's chat template", False: "without a chat template"}.get(
        needles.get("chat_template"))
    details = [f"{needles['trials']} trial(s) per length and depth (depths "
               f"{', '.join(f'{d:.0%}' for d in needles['depths'])})", "greedy decoding",
               "scored as RULER scores them (the share of the expected values found in the answer)" if ruler else "",
               "the passkey as the first number answered" if "passkey" in tasks else "",
               f"prompts {template}" if template else "",
               f"haystack from {_haystack_names(needles['haystack'])}" if needles.get("haystack") else ""]
    lines = [f"Needle retrieval: {', '.join(tasks)}"
             + (" (the tasks of [RULER](https://arxiv.org/abs/2404.06654))" if ruler else "") + "; "
             + ", ".join(part for part in details if part) + ". Accuracy, the mean over the tasks and depths measured "
             "at each length"
             + (f"; {SOURCE}: the source model at its own window" if needles.get("source_window") else "") + ":\n"]
    lines += needle_table(tasks)
    verdict = needle_verdict(needles)
    if verdict:
        lines.append("\n" + " ".join(verdict))
    lines.append("\n" + " ".join(f"![{task}](eval/{task}.png)" for task in tasks) + "\n")
    return lines


def needle_table(tasks: dict[str, dict[str, Any]], corner: str = "method") -> list[str]:
    """Markdown rows of the needle tasks of results.json ({task: {"accuracy": {method: {length: {depth:
    accuracy}}}}}): each method's accuracy at each length, the mean over the tasks and depths measured there."""
    scores: dict[str, dict[str, list[float]]] = {}
    for measured in tasks.values():
        for method, by_length in measured["accuracy"].items():
            for n, by_depth in by_length.items():
                scores.setdefault(method, {}).setdefault(str(n), []).extend(by_depth.values())
    means = {method: {n: sum(values) / len(values) for n, values in by_length.items()}
             for method, by_length in scores.items()}
    return _by_length_table(means, corner, "{:.0%}".format)


def needle_verdict(needles: dict[str, Any]) -> list[str]:
    """What the needle tasks say, in sentences: at its own window, the tasks the source model scores under
    50% on (too hard for this model: they rank no method); on the others, the checkpoint against YaRN at
    each length beyond the window, on the same prompts. [] without the source's row (no baselines)."""
    window = needles.get("source_window")
    tasks = needles["tasks"]
    if not window:
        return []
    own = {task: _mean(measured["accuracy"][SOURCE][str(window)]) for task, measured in tasks.items()}
    weak = [task for task, score in own.items() if score < 0.5]
    usable = [task for task in tasks if task not in weak]
    sentences = []
    if weak:
        sentences.append(f"At its own window ({window:,} tokens) the source model scores under 50% on "
                         + ", ".join(f"{task} ({own[task]:.0%})" for task in weak)
                         + ": reported, not used to rank the methods.")
    if not usable:
        sentences.append("No task is left to rank the methods with.")
        return sentences
    checkpoint = next(iter(next(iter(tasks.values()))["accuracy"]))
    lengths = sorted({int(n) for task in usable for n in tasks[task]["accuracy"][checkpoint]
                      if int(n) > window and "yarn" in tasks[task]["accuracy"]})
    for n in lengths:
        ours, yarn = (_mean([value for task in usable for value in tasks[task]["accuracy"][method].get(str(n), {})
                             .values()]) for method in (checkpoint, "yarn"))
        verb = "retrieves better than" if ours > yarn else "retrieves worse than" if ours < yarn else "retrieves as well as"
        sentences.append(f"At {n:,} tokens, on {', '.join(usable)} (the source scores at least 50% on "
                         f"{'it' if len(usable) == 1 else 'them'} at its own window, "
                         f"{_mean([own[task] for task in usable]):.0%}), {checkpoint} {verb} YaRN on the same "
                         f"prompts: {ours:.0%} against {yarn:.0%}.")
    return sentences


def _mean(values) -> float:
    values = list(values.values()) if isinstance(values, dict) else list(values)
    return sum(values) / len(values) if values else float("nan")


def _by_length_table(values: dict[str, dict[str, Any]], corner: str, cell: Callable[[Any], str]) -> list[str]:
    lengths = sorted({int(n) for by_length in values.values() for n in by_length})
    lines = [f"| {corner} | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for method, by_length in values.items():
        lines.append(f"| {method} | " + " | ".join(cell(by_length[str(n)]) if str(n) in by_length else ""
                                                   for n in lengths) + " |")
    return lines


def json_number(value: float) -> float | str:
    """A float as results.json holds it: itself when finite, else "inf", "-inf" or "nan" (JSON has no
    such numbers; float() reads the strings back)."""
    return value if math.isfinite(value) else str(value)


def read_evaluation(folder: Path) -> dict[str, Any] | None:
    """eval/results.json of a checkpoint, None without one. Results written before the needle tasks existed
    hold their passkey test under "passkey": it is read as the needle task it now is."""
    path = folder / EVAL_DIR / EVAL_RESULTS
    if not path.is_file():
        return None
    evaluation = json.loads(path.read_text())
    passkey = evaluation.pop("passkey", None)
    if passkey and "needles" not in evaluation:
        evaluation["needles"] = {"depths": passkey["depths"], "trials": passkey["trials"], "seed": passkey["seed"],
                                 "tasks": {"passkey": {"accuracy": passkey["accuracy"]}}}
    return evaluation


def _tool_sections(body: str) -> list[tuple[str, int, int, dict[str, Any]]]:
    """(name, start, end, attributes) of each tool section in a card body, by markers, or for a card
    written before markers existed, by the tool's headings (up to the next heading of level 1 or 2)."""
    found = [(m["name"], m.start(), m.end(), json.loads(m["attributes"] or "{}")) for m in MARKED_SECTION.finditer(body)]
    if found or LEGACY_SIGNATURE not in body:  # a card the tool did not write has no sections of the tool
        return found
    lines = body.splitlines(keepends=True)
    starts, offset, fenced = [], 0, False
    for line in lines:
        fenced ^= line.startswith("```")
        heading = line.rstrip()
        if not fenced and heading.startswith(("# ", "## ")):
            first_heading = not starts
            starts.append((offset, "summary" if first_heading and heading.startswith("# ")
                           else LEGACY_HEADINGS.get(heading)))
        offset += len(line)
    found = []
    for (start, name), (end, _) in zip(starts, starts[1:] + [(len(body), None)]):
        if name is not None:
            end = start + len(body[start:end].rstrip("\n")) + 1  # the blank lines after it are not its own
            snippet = LEGACY_SNIPPET.search(body, start, end) if name == "usage" else None
            found.append((name, start, end, {"repo": snippet["repo"], "revision": snippet["revision"]} if snippet else {}))
    return found


def refresh_card(folder: Path, repo: str | None = None, revision: str | None = None) -> str:
    """Rewrite a converted checkpoint's README.md as updated_card gives it; returns the text."""
    text = updated_card(folder, repo, revision)
    write_text_atomically(Path(folder) / CARD_FILE, text)
    return text


def updated_card(folder: Path, repo: str | None = None, revision: str | None = None) -> str:
    """A converted checkpoint's README.md with the tool's sections rewritten from its factor file and
    eval/results.json, and everything else (front matter, the user's sections) as it is.

    repo and revision: what the loading snippet loads; when repo is None, what the card already names
    (the folder, for a card that names nothing).
    """
    card = Path(folder) / CARD_FILE
    existing = card.read_text(encoding="utf-8") if card.is_file() else ""
    head, body = _split_front_matter(existing)
    found = _tool_sections(body)
    if repo is None:
        usage = next((attributes for name, _, _, attributes in found if name == "usage" and attributes), {})
        repo, revision = usage.get("repo", str(folder)), usage.get("revision")
    base_model = front_matter(existing).get("base_model")
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    names = [path.name for path in Path(folder).iterdir() if path.is_file()]
    sections = _sections(load_factor_set(Path(folder) / FACTORS_FILE), base_model if isinstance(base_model, str)
                         else None, repo, revision, read_evaluation(Path(folder)),
                         (read_marker(folder) or {}).get("changes", []), config, has_tokenizer(names))
    return (head or _metadata_block(None, {})) + _merge(body, found, sections)


def _merge(body: str, found: list[tuple[str, int, int, dict[str, Any]]], sections: dict[str, str]) -> str:
    """The body with each tool section found replaced by its new text. The evaluation, the first time,
    goes after the last tool section before it in card order; a section the user deleted stays deleted.
    A body without tool sections gets them all at its end."""
    if not found:
        return (body.rstrip("\n") + "\n\n" if body.strip() else "\n") + "\n".join(sections.values())
    present = [name for name, *_ in found]
    anchors = {} if "evaluation" in present or "evaluation" not in sections else {
        "evaluation": next((name for name in reversed(SECTIONS[:-1]) if name in present), present[-1])}
    pieces, position = [], 0
    for name, start, end, _ in found:
        pieces += [body[position:start], sections.get(name, body[start:end])]
        pieces += ["\n" + sections[new] for new, anchor in anchors.items() if anchor == name]
        position = end
    return "".join(pieces) + body[position:]
