"""The search of LongRoPE factors (lambda and n_hat) for a model: task, fitness, baselines, the run.

Fitness: perplexity of the model with a candidate's factors over K documents of the evaluation
length (each: BOS + its first length - 1 tokens), exp(total NLL / total tokens); with the needle
objective (LongRoPE2, arXiv 2502.20082), over the answer tokens only of K needle items of that
length built on the documents (needles.objective_items). The model is
loaded once and every candidate is swapped into its rotary embedding in place (the module that
ships in checkpoints). Documents longer than the original window use the long set; a short-factor
search evaluates at the original window, where the short set is in use.

The evolution itself (space, operators, presets, budgets) is in evolution.py, the JSONL log and
resume in search_log.py, the spreading of evaluations over torchrun processes in workers.py.
Initial population: the analytic sets on the grid (PI, NTK, YaRN, llama3 and NTK and YaRN moved to LongRoPE2's
critical dimension), then mutants of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .documents import data_provenance, portable_document_name
from .errors import DataError, LongRoPEError, TargetError
from .evolution import (
    DEFAULT_OBJECTIVE,
    DEFAULT_SPACE,
    NLL,
    OBJECTIVE_LABELS,
    OBJECTIVES,
    PRESETS,
    SPACES,
    Candidate,
    Evolution,
    SearchResult,
    SearchSpace,
    n_hat_choices,
    perplexity_of,
    rank_finalists,
)
from .factors import (
    ANALYTIC_METHODS,
    FactorSet,
    ModelFingerprint,
    analytic_factors,
    baseline_factor_sets,
    compose,
    new_provenance,
    provenance_count,
    source_factor_set,
)
from .needles import OBJECTIVE_TASK, RULER_TASKS, ItemTooShort, chat_frame, haystack_windows, objective_items
from .perplexity import token_nll, use_factor_set
from .search_log import LOG_VERSION, SearchLog, config_sha256, file_sha256, tokens_sha256
from .source_rope import critical_dimension, long_attention_scales
from .workers import Workers


@dataclass
class SearchTask:
    """What to search: how a candidate becomes a factor set, the space and the starting candidates."""

    # long mode: the source's own RoPE at the target (factors.source_factor_set), which candidates compose on;
    # short mode: the LongRoPE checkpoint's set, whose short factors candidates replace
    base: FactorSet
    long_mode: bool
    space: SearchSpace
    initial: list[Candidate]
    # long mode: the attention scales considered (rule -> long mscale); the evolution runs with the first
    attention_scales: dict[str, float] = field(default_factory=dict)

    def factor_set(self, candidate: Candidate) -> FactorSet:
        if self.long_mode:
            return compose(self.base, candidate.factors, n_hat=candidate.n_hat)
        return replace(self.base, short_factor=candidate.factors, short_set="factors")


def long_search_task(model: ModelFingerprint, target: int, n_hat: bool, high: float | None = None,
                     n_hat_mscale: str | None = None, space: str = DEFAULT_SPACE) -> SearchTask:
    """Search long factors for `target` relative to the source's own (factors.compose): for the extension
    s = target / the length L the source already serves, lambda within [1, high or 1.25 s] in the "full" space,
    starting from the analytic sets; in the "critical" space (LongRoPE2, arXiv 2502.20082) lambda >= s from the
    critical dimension c of rope_theta at L on (source_rope.critical_dimension) and the geometric ramp below it,
    starting from the analytic sets snapped into it (which all give the ramp with s from c on) and NTK's ramp
    continued past c, lambda_i = s^(i/c) up to the top bound. With `n_hat`, n_hat among the choices below the
    original window. Every candidate is scored with the attention scale below n_hat that its factor set will be
    written with: `n_hat_mscale`, or the default of factors.source_factor_set. Raises LongRoPEError for a target
    the source already reaches or an unknown space."""
    if space not in SPACES:
        raise LongRoPEError(f"unknown search space '{space}' (choose one of {', '.join(SPACES)})")
    base_set = source_factor_set(model, target)
    if n_hat_mscale is not None:
        base_set = replace(base_set, n_hat_mscale=n_hat_mscale)
    base = model.base_factor_set()
    reach = base.max_position_embeddings
    scale, half = target / reach, model.head_dim // 2
    # n_hat applies to both sets: when the short set is not exactly the source's angles (a LongRoPE source's own
    # short factors), another n_hat would change the model inside its window, so the source's is kept.
    searched_n_hat = n_hat and base.short_is_source_rope
    choices = n_hat_choices(base.original_max_position_embeddings) if searched_n_hat else (base.n_hat,)
    critical = critical_dimension(model.head_dim, model.rope_theta, reach) if space == "critical" else 0
    search_space = SearchSpace.from_bounds(half, scale if critical else 1.0, high or 1.25 * scale, choices, critical)
    seeds = [analytic_factors(method, scale, model.head_dim, model.rope_theta, reach)[0] for method in ANALYTIC_METHODS]
    if critical:
        seeds.append([scale ** (i / critical) for i in range(half)])
    return SearchTask(base=base_set, long_mode=True, space=search_space,
                      initial=[search_space.snap(factors, base.n_hat) for factors in seeds],
                      attention_scales=long_attention_scales(base, target))


def short_search_task(checkpoint: FactorSet, high: float | None = None) -> SearchTask:
    """Search short factors of a LongRoPE checkpoint at its original window (n_hat kept)."""
    dims = len(checkpoint.short_factor)
    space = SearchSpace.from_bounds(dims, 1.0, high or 2.0, (checkpoint.n_hat,))
    initial = [space.snap(checkpoint.short_factor, checkpoint.n_hat), space.snap([1.0] * dims, checkpoint.n_hat)]
    return SearchTask(base=checkpoint, long_mode=False, space=space, initial=initial)


def document_nll(model, factor_set: FactorSet, input_ids: torch.Tensor, scored: torch.Tensor | None = None) -> NLL:
    """(sum of token NLLs, tokens) of one document [1, length] under a factor set swapped into the model: of every
    token after the first, or of the tokens at the `scored` positions only."""
    use_factor_set(model, factor_set)  # the document's length selects the long or short set
    nll = token_nll(model, input_ids, positions=scored)
    return math.fsum(nll.double().flatten().tolist()), nll.numel()


class ModelFitness:
    """NLL of factor sets on the search documents (of their `scored` positions, when given: the needle objective):
    replayed from the log when known, computed otherwise (spread over the torchrun processes). Implements
    evolution.Fitness for the task's candidates."""

    def __init__(self, model, token_ids: list[torch.Tensor], log: SearchLog, workers: Workers,
                 task: SearchTask, scored: list[torch.Tensor] | None = None, key_prefix: str = "") -> None:
        self.model, self.token_ids, self.log, self.workers, self.task = model, token_ids, log, workers, task
        self.scored = scored or [None] * len(token_ids)
        self.key_prefix = key_prefix  # logged as "<prefix><candidate key>": other documents than the search's
        self.documents = len(token_ids)
        self.computed, self.seconds = 0, 0.0  # document evaluations computed (not replayed) and their time

    def nll(self, requests: Sequence[tuple[Candidate, int]], on_result: Callable[[Candidate, int, NLL], None],
            keep_going: Callable[[], bool]) -> None:
        self.evaluate([(c, self.key_prefix + c.key, self.task.factor_set(c), doc) for c, doc in requests], on_result,
                      keep_going)

    def evaluate(self, requests: Sequence[tuple[Any, str, FactorSet, int]], on_result: Callable[[Any, int, NLL], None],
                 keep_going: Callable[[], bool]) -> None:
        """(item, log key, factor set, document) requests; on_result(item, document, NLL) as each finishes.
        Logged ones are replayed at no cost; before computing each round, rank 0's keep_going() decides."""
        todo = []
        for item, key, factor_set, doc in requests:
            if (key, doc) in self.log.known:
                on_result(item, doc, self.log.known[(key, doc)])
            else:
                todo.append((item, key, factor_set, doc))

        def compute(request) -> tuple[float, int, float]:
            _, _, factor_set, doc = request
            started = time.perf_counter()
            nll = document_nll(self.model, factor_set, self.token_ids[doc], self.scored[doc])
            return *nll, time.perf_counter() - started

        def record(request, result) -> None:
            item, key, _, doc = request
            nll_sum, tokens, seconds = result
            self.computed, self.seconds = self.computed + 1, self.seconds + seconds
            self.log.append(key, doc, nll_sum, tokens, seconds)
            on_result(item, doc, (nll_sum, tokens))

        self.workers.map(compute, todo, record, keep_going)


def baseline_sets(task: SearchTask) -> dict[str, FactorSet]:
    """What the search is compared with: in a long search the source's own RoPE carried past its window
    ("none") and the classic sets composed on it at their own attention scales (factors.baseline_factor_sets);
    in a short search the checkpoint's own short factors ("before")."""
    if not task.long_mode:
        return {"before": task.base}
    return baseline_factor_sets(task.base.model, task.base.target_length)


def set_perplexities(sets: dict[str, FactorSet], fitness: ModelFitness, keep_going: Callable[[], bool],
                     on_evaluation: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Perplexity of each set ({log key: set}) on the search documents, in order, while keep_going()
    allows; a set not finished in time is left out."""
    results: dict[tuple[str, int], NLL] = {}

    def record(key: str, doc: int, nll: NLL) -> None:
        results[(key, doc)] = nll
        on_evaluation()

    fitness.evaluate([(key, key, factor_set, doc) for key, factor_set in sets.items()
                      for doc in range(fitness.documents)], record, keep_going)
    return {key: perplexity_of(results[(key, doc)] for doc in range(fitness.documents)) for key in sets
            if all((key, doc) in results for doc in range(fitness.documents))}


def baseline_perplexities(sets: dict[str, FactorSet], fitness: ModelFitness, keep_going: Callable[[], bool],
                          on_evaluation: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Perplexity of each baseline set (baseline_sets), logged as "baseline:<name>"; those not finished in
    time are left out."""
    measured = set_perplexities({f"baseline:{name}": factor_set for name, factor_set in sets.items()}, fitness,
                                keep_going, on_evaluation)
    return {name: measured[f"baseline:{name}"] for name in sets if f"baseline:{name}" in measured}


def measured_attention_scales(task: SearchTask, fitness: ModelFitness, result: SearchResult,
                              keep_going: Callable[[], bool],
                              on_evaluation: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """The best candidate's perplexity at each attention scale the task considers ({rule: {"long_mscale",
    "perplexity"}}): the evolution's own for the first, one more evaluation for each other (left out when
    keep_going() stops it)."""
    if result.best is None or not task.attention_scales:
        return {}
    (first, first_mscale), *others = task.attention_scales.items()
    measured = {first: {"long_mscale": first_mscale, "perplexity": result.best_perplexity}}
    best = task.factor_set(result.best)
    sets = {f"attention:{rule}:{result.best.key}": replace(best, long_mscale=mscale) for rule, mscale in others}
    perplexities = set_perplexities(sets, fitness, keep_going, on_evaluation)
    for rule, mscale in others:
        key = f"attention:{rule}:{result.best.key}"
        if key in perplexities:
            measured[rule] = {"long_mscale": mscale, "perplexity": perplexities[key]}
    return measured


def searched_factor_set(task: SearchTask, result: SearchResult,
                        attention_scales: dict[str, dict[str, float]]) -> tuple[FactorSet, float]:
    """The best candidate's factor set and perplexity; in long mode at the attention scale that measured best
    among `attention_scales` (measured_attention_scales), recorded in its composition provenance."""
    best = task.factor_set(result.best)
    if not attention_scales or "composition" not in best.provenance:  # a source without RoPE scaling: one rule
        return best, result.best_perplexity
    rule = min(attention_scales, key=lambda name: attention_scales[name]["perplexity"])
    measured = {name: {**scale, "perplexity": round(scale["perplexity"], 4)}
                for name, scale in attention_scales.items()}
    composition = {**best.provenance["composition"], "attention_scale": rule, "attention_scales": measured}
    return (replace(best, long_mscale=attention_scales[rule]["long_mscale"],
                    provenance={**best.provenance, "composition": composition}),
            attention_scales[rule]["perplexity"])


BASELINE_LABELS = {"none": "the source's own RoPE unchanged", "pi": "PI", "ntk": "NTK", "yarn": "YaRN", "llama3": "llama3",
                   "before": "the checkpoint's own short factors"}
BUDGET_LABELS = {"max_evals": "evaluation budget (--max-evals)", "time_budget": "time budget (--time-budget)"}


@dataclass(frozen=True)
class Verdict:
    """What a search may call its result: `method` for the factor file, a one-sentence `warning`
    when that is not a searched set, and the baseline whose factors are written instead, if any."""

    method: str
    warning: str | None = None
    baseline: str | None = None


def verdict(result: SearchResult, baselines: dict[str, float], long_mode: bool, measure: str = "perplexity") -> Verdict:
    """Honest label of a search's outcome. "search" ("search:short") only for a search that evolved
    and whose best is not worse than any baseline it measured. A measured baseline that is better
    wins: its factors are written ("baseline:<name>"), since knowingly shipping worse factors helps
    nobody. A budget spent before any evolution step gives "search:no-evolution" (the best of the
    initial population). Raises LongRoPEError when nothing at all was scored in time."""
    searched = "search" if long_mode else "search:short"
    best_baseline = min(baselines, key=baselines.get, default=None)
    if best_baseline is not None and baselines[best_baseline] < result.best_perplexity:
        label, perplexity = BASELINE_LABELS[best_baseline], baselines[best_baseline]
        if result.best is None:
            why = (f"The {BUDGET_LABELS.get(result.stopped_by, 'budget')} ended before any candidate was scored "
                   "on all documents")
        else:
            why = (f"The search's best ({measure} {result.best_perplexity:.4f} after {result.evaluations:.1f} "
                   f"evaluations) is worse than {label} ({perplexity:.4f}) on the same data")
        return Verdict(f"baseline:{best_baseline}", f"{why}, so these are the factors of {label}, not searched ones.",
                       best_baseline)
    if result.best is None:
        raise LongRoPEError(f"the {BUDGET_LABELS.get(result.stopped_by, 'budget')} ended before any candidate or "
                            "baseline was scored on all documents: nothing to write; resume the log with a larger one")
    if result.iterations == 0:
        spent = BUDGET_LABELS.get(result.stopped_by, "budget")
        return Verdict(f"{searched}:no-evolution",
                       f"The {spent} ended before any evolution step, so these factors are the best of the initial "
                       f"population (analytic sets on the search grid and their mutants) after "
                       f"{result.evaluations:.1f} evaluations, not evolved ones.")
    return Verdict(searched)


def search_log_header(source, task: SearchTask, names: list[str], token_ids: list[torch.Tensor],
                      skipped_documents: int, eval_length: int, seed: int, preset_name: str,
                      budget: dict[str, Any], objective: dict[str, Any] | None = None) -> dict[str, Any]:
    """The log's first line: the settings a resume must share, with content hashes of the documents'
    tokens and of the model's config and weight files (these hash the weights: ~1.3 GB/s), and the needle
    objective's settings with a hash of its masks (absent for perplexity, as in logs before it)."""
    return {
        "version": LOG_VERSION,
        "source": source.name,
        "model": asdict(task.base.model),
        "model_files": {"config_sha256": config_sha256(source.config),
                        "weights_sha256": {path.name: file_sha256(path) for path in source.weight_files}},
        "mode": "long" if task.long_mode else "short",
        "target_length": task.base.target_length,
        "base_long_factor": task.base.long_factor,
        "n_hat_mscale": task.base.n_hat_mscale,  # what the candidates' scores mean for n_hat > 0
        "space": asdict(task.space),
        "documents": [{"name": name, "tokens_sha256": tokens_sha256(ids)} for name, ids in zip(names, token_ids)],
        "skipped_documents": skipped_documents,  # shorter than the evaluation length
        "eval_length": eval_length,
        "seed": seed,
        "preset": preset_name,
        "budget": budget,
        **({"objective": objective} if objective else {}),
    }


NEEDLE_FINALISTS = 4  # "ppl+needle": the fittest this many by perplexity are ranked on the needle items


@dataclass
class NeedleDocuments:
    """Needle items as the search scores them: token ids [1, length], the names of their haystack windows, how many
    documents were too short, the positions scored in each (its answer values' tokens), and the settings that made
    them with a hash of every mask (for the log header and the factor file)."""

    tokens: list[torch.Tensor]
    names: list[str]
    skipped: int
    scored: list[torch.Tensor]
    settings: dict[str, Any]


@dataclass
class SearchPlan:
    """A search checked and prepared before any model is loaded (task, documents tokenized, budget), so that bad
    input fails in seconds and a dry run shows the caps the run will keep: plan_search makes it, SearchRun runs it."""

    source: Any  # source.SourceModel
    task: SearchTask
    eval_length: int  # tokens per document evaluation
    data: list[str]
    documents: list[torch.Tensor]  # [1, eval_length] each
    document_names: list[str]
    skipped_documents: int  # shorter than eval_length
    requested_documents: int
    preset_name: str
    max_evals: float | None  # evaluations (one = a candidate on every document)
    time_budget: float | None  # seconds
    seed: int
    baselines: bool
    budget: dict[str, Any]  # as asked, for the log header: {"max_evals": None for the preset's, "time_budget"}
    objective: str = DEFAULT_OBJECTIVE
    # "needle": the documents above are these items; "ppl+needle": they rank the perplexity's finalists
    needles: NeedleDocuments | None = None

    @property
    def scored(self) -> list[torch.Tensor] | None:
        """The positions the fitness scores in each document (None: every token)."""
        return self.needles.scored if self.objective == "needle" else None

    @property
    def preset(self):
        return PRESETS[self.preset_name]

    @property
    def planned_document_evaluations(self) -> int:
        """At most this many document forwards (fewer when children are raced out or patience stops it): the
        evolution's, within the evaluation budget (or the preset's), the baselines' and the other attention
        scales'."""
        preset, n_hat_variants, documents = self.preset, len(self.task.space.n_hat_choices) - 1, len(self.documents)
        candidates = (preset.population + preset.n_hat_sweep * n_hat_variants + preset.iterations * (
            preset.mutations * (1 + min(preset.n_hat_tries, n_hat_variants)) + preset.crossovers))
        ranking = min(preset.selection_documents or documents, documents)
        forwards = candidates * ranking + (preset.finalists * (documents - ranking) if ranking < documents else 0)
        if self.max_evals is not None:
            forwards = min(forwards, math.floor(self.max_evals * documents + 1e-9))
        extra = (len(baseline_sets(self.task)) if self.baselines else 0) + max(len(self.task.attention_scales) - 1, 0)
        return forwards + extra * documents + self.needle_ranking_forwards

    @property
    def needle_ranking_forwards(self) -> int:
        """"ppl+needle": the forwards that rank the perplexity's finalists on the needle items."""
        return NEEDLE_FINALISTS * len(self.needles.tokens) if self.objective == "ppl+needle" else 0

    @property
    def caps_line(self) -> str:
        """What the search will cost at most, in words: the first status line, and the dry run's."""
        space = self.task.space
        if space.critical:
            where = (f"critical space: dimensions {space.critical}-{space.dims - 1} searched, lambda >= the extension, "
                     f"a ramp below LongRoPE2's critical dimension {space.critical}")
        else:
            where = f"full space: all {space.dims} dimensions searched"
        budget = ("no evaluation cap" if self.max_evals is None
                  else f"at most {self.max_evals:g} evaluations (one = a candidate on every document)")
        documents = (f"{len(self.documents)} needle items, {sum(map(len, self.scored))} answer tokens scored"
                     if self.scored else f"{len(self.documents)} documents")
        if self.objective == "ppl+needle":
            documents += (f"; the {NEEDLE_FINALISTS} fittest ranked on {len(self.needles.tokens)} needle items, "
                          f"{sum(map(len, self.needles.scored))} answer tokens scored")
        return (f"search: preset {self.preset_name}, {where}; {budget}, at most {self.planned_document_evaluations} "
                f"document forwards of {self.eval_length} tokens in all ({documents}"
                + (", baselines included)" if self.baselines else ")"))

    def summary(self) -> dict[str, Any]:
        return {"data": self.data, "documents": len(self.documents), "eval_length": self.eval_length,
                "preset": self.preset_name, "max_evals": self.max_evals, "time_budget_s": self.time_budget,
                "seed": self.seed, "baselines": self.baselines, "objective": self.objective,
                "space": "critical" if self.task.space.critical else "full", "max_document_forwards": self.planned_document_evaluations, "caps": self.caps_line}


def plan_search(*, source, data: list[str], target: int | None, log_path: Path | None = None, documents: int = 4,
                preset: str = "default", max_evals: float | None = None, time_budget: float | None = None,
                seed: int = 0, n_hat: bool | None = None, short: bool = False, max_factor: float | None = None,
                resume: bool = False, baselines: bool = True, n_hat_mscale: str | None = None,
                space: str | None = None, objective: str = DEFAULT_OBJECTIVE,
                needle_task: str = OBJECTIVE_TASK) -> SearchPlan:
    """Check a search of `source` (a source.SourceModel) and prepare it without loading the model: the task, the
    documents of `data` tokenized (`documents` of them, of the evaluation length: `target`, or the original window
    with `short`; with the "needle" `objective`, as many `needle_task` items built on them, needle_documents), the
    budget (`max_evals` evaluations, default the preset's; `time_budget` seconds), n_hat searched or not (`n_hat`, default
    the preset's). Writes nothing. Raises LongRoPEError for settings that cannot be searched, DataError for
    unreadable data, LongRoPEError when no document is long enough."""
    from transformers import AutoTokenizer

    from .documents import read_documents
    from .perplexity import tokenized_documents
    from .preflight import check_search_inputs

    check_search_inputs(source, data, log_path, resume)
    if preset not in PRESETS:
        raise LongRoPEError(f"{{preset}} must be one of {', '.join(PRESETS)}, got {preset!r}", setting="preset",
                            value=preset)
    n_hat = PRESETS[preset].n_hat if n_hat is None else n_hat
    if objective not in OBJECTIVES:
        raise LongRoPEError(f"{{objective}} must be one of {', '.join(OBJECTIVES)}, got {objective!r}",
                            setting="objective", value=objective)
    if needle_task not in RULER_TASKS:
        raise LongRoPEError(f"{{needle_task}} must be one of {', '.join(RULER_TASKS)}, got {needle_task!r}",
                            setting="needle_task", value=needle_task)
    if objective == "ppl" and needle_task != OBJECTIVE_TASK:
        raise LongRoPEError("{needle_task} applies to {objective} needle or ppl+needle", setting="needle_task",
                            value=needle_task)
    task, eval_length = _search_task(source, target, short, n_hat, max_factor, n_hat_mscale, space)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    needles = None
    if objective != "ppl":
        needles = needle_documents(tokenizer, read_documents(list(data)), eval_length, documents, objective,
                                   needle_task)
    if objective == "needle":
        tokens, names, skipped = needles.tokens, needles.names, needles.skipped
    else:
        tokens, names, skipped = tokenized_documents(tokenizer, read_documents(list(data)), eval_length,
                                                     limit=documents, windows=True)
    if not tokens or needles is not None and not needles.tokens:  # no item to rank ppl+needle's finalists on either
        raise DataError(f"{{data}} has no document of at least {eval_length} tokens ({skipped} shorter ones skipped)",
                        setting="data", bound=eval_length)
    return SearchPlan(source=source, task=task, eval_length=eval_length, data=list(data), documents=tokens,
                      document_names=names, skipped_documents=skipped, requested_documents=documents,
                      preset_name=preset, max_evals=PRESETS[preset].max_evals if max_evals is None else max_evals,
                      time_budget=time_budget, seed=seed, baselines=baselines,
                      budget={"max_evals": max_evals, "time_budget": time_budget}, objective=objective,
                      needles=needles)


def needle_documents(tokenizer, documents, length: int, count: int, objective: str,
                     task: str = OBJECTIVE_TASK) -> NeedleDocuments:
    """The needle items of `objective` ("needle", "ppl+needle"): one of `task` and `length` tokens
    (needles.objective_items, in the tokenizer's chat template when it has one) on each of `count` haystack windows
    of `documents`. Raises LongRoPEError when `length` cannot hold an item."""
    windows, skipped = haystack_windows(tokenizer, ((d.name, d.text) for d in documents), length, count)
    chat = chat_frame(tokenizer, use_chat_template=True)
    try:
        items = objective_items(tokenizer, windows, length, task=task, chat=chat)
    except ItemTooShort as error:
        raise LongRoPEError(f"{{objective}} {objective}: {error}", setting="objective", value=objective) from None
    masks, tokens = [item.answer_positions for item in items], [torch.tensor([item.input_ids]) for item in items]
    settings = {"name": objective, "task": task, "items_seed": 0, "chat_template": bool(chat[0]),
                "depths": [round(item.depth, 4) for item in items], "answer_tokens": [len(mask) for mask in masks],
                "items_sha256": [tokens_sha256(ids) for ids in tokens],
                "masks_sha256": hashlib.sha256(json.dumps(masks).encode()).hexdigest()}
    return NeedleDocuments(tokens, [window.name for window in windows], skipped,
                           [torch.tensor(mask) for mask in masks], settings)


def _search_task(source, target: int | None, short: bool, n_hat: bool, max_factor: float | None,
                 n_hat_mscale: str | None, space: str | None) -> tuple[SearchTask, int]:
    stage = source.longrope
    if short:
        if space not in (None, "full"):
            raise LongRoPEError(f"{{short}} searches every short factor: {{space}} {space} is for long factors",
                                setting="space", value=space)
        if stage is None:
            raise LongRoPEError("{short} searches the short factors of a LongRoPE checkpoint; "
                                f"'{source.folder}' is a plain model (its short factors are 1.0)", setting="short",
                                file=source.folder)
        if target not in (None, stage.target_length):
            raise TargetError(f"{{short}} keeps the checkpoint's target {stage.target_length}; drop {{target}}",
                              setting="target", value=target, bound=stage.target_length)
        return short_search_task(stage, max_factor), stage.model.original_max_position_embeddings
    if target is None:
        raise TargetError("{target} is required (except with {short})", setting="target")
    return (long_search_task(source.fingerprint, target, n_hat, max_factor, n_hat_mscale, space or DEFAULT_SPACE),
            target)


class SearchRun:
    """A search planned (plan_search), its log opened and its model loaded, then run by `execute`.

    Takes plan_search's arguments, or a ready `plan`. Raises as plan_search does, and LongRoPEError for a log
    that exists (without resume) or does not match (with resume).
    """

    def __init__(self, *, source=None, data: list[str] = (), target: int | None = None, log_path: Path,
                 documents: int = 4, preset: str = "default", max_evals: float | None = None,
                 time_budget: float | None = None, seed: int = 0, n_hat: bool | None = None, short: bool = False,
                 max_factor: float | None = None, resume: bool = False, baselines: bool = True,
                 device_map: str | None = None, n_hat_mscale: str | None = None, space: str | None = None,
                 objective: str = DEFAULT_OBJECTIVE, needle_task: str = OBJECTIVE_TASK, plan: SearchPlan | None = None,
                 status: Callable[[str], None] = lambda message: None) -> None:
        from .convert import longrope_config
        from .perplexity import load_longrope_model

        if plan is None:
            plan = plan_search(source=source, data=data, target=target, log_path=log_path, documents=documents,
                               preset=preset, max_evals=max_evals, time_budget=time_budget, seed=seed, n_hat=n_hat,
                               short=short, max_factor=max_factor, resume=resume, baselines=baselines,
                               n_hat_mscale=n_hat_mscale, space=space, objective=objective, needle_task=needle_task)
        self.plan = plan
        self.workers = Workers()
        self.status = status if self.workers.is_main else (lambda message: None)
        source, documents = plan.source, plan.requested_documents
        self.source, self.preset_name, self.preset = source, plan.preset_name, plan.preset
        self.max_evals, self.time_budget, self.seed, self.baselines = (plan.max_evals, plan.time_budget, plan.seed,
                                                                       plan.baselines)
        self.task, self.eval_length, self.data = plan.task, plan.eval_length, plan.data
        self.documents, self.document_names, skipped = plan.documents, plan.document_names, plan.skipped_documents
        self.status(self.caps_line)
        sources = len({name.partition("#window")[0] for name in self.document_names})
        windows = f", windows of {sources} of them" if sources < len(self.documents) else ""
        self.status(f"data: {len(self.documents)} documents of {self.eval_length} tokens{windows} "
                    f"({skipped} shorter documents skipped)")
        if sources < len(self.documents):
            self.status(f"note: --data has {sources} document{'s' if sources > 1 else ''} of at least "
                        f"{self.eval_length} tokens for --documents {documents}: the search takes consecutive "
                        f"{self.eval_length}-token windows of the longer ones ({', '.join(self.document_names)})")
        if len(self.documents) < documents:
            self.status(f"warning: --documents {documents}, but --data has only {len(self.documents)} windows of "
                        f"{self.eval_length} tokens; the search uses those")
        if plan.needles:
            settings = plan.needles.settings
            items = (f"{len(plan.needles.tokens)} {settings['task']} needle items ({sum(settings['answer_tokens'])} "
                     f"answer tokens; needles at depths {', '.join(f'{d:.0%}' for d in settings['depths'])}"
                     + (", in the chat template)" if settings["chat_template"] else ")"))
            self.status(f"objective: answer-token perplexity of {items}" if plan.objective == "needle" else
                        f"objective: perplexity; its {NEEDLE_FINALISTS} fittest ranked at the end on the answer-token "
                        f"perplexity of {items}")
        self.log = SearchLog(log_path, lambda: search_log_header(
            source, self.task, self.document_names, self.documents, skipped, self.eval_length, self.seed,
            self.preset_name, plan.budget, plan.needles.settings if plan.needles else None), resume, self.workers)
        if resume:
            self.status(f"search log: {len(self.log.known)} evaluations replayed from {log_path}")
        where = f"device map {device_map}" if device_map else str(self.workers.device)
        self.status(f"model: loading {source.folder} on {where} "
                    f"({self.workers.world} process{'es' if self.workers.world > 1 else ''})")
        self.model = load_longrope_model(source.folder, longrope_config(source.config, self.task.base),
                                         self.workers.device, device_map=device_map, gpus=self.workers.gpus)

    @property
    def planned_document_evaluations(self) -> int:
        return self.plan.planned_document_evaluations

    @property
    def progress_work(self) -> list[int]:
        """The planned document evaluations as progress.StepTimer steps: those replayed from a resumed log (they
        come first, in the order they were logged) cost nothing, each other one a forward."""
        replayed = min(len(self.log.known), self.planned_document_evaluations)
        return [0] * replayed + [1] * (self.planned_document_evaluations - replayed)

    @property
    def caps_line(self) -> str:
        return self.plan.caps_line

    def execute(self, on_evaluation: Callable[[], None] = lambda: None,
                on_best: Callable[[float], None] = lambda ppl: None) -> tuple[FactorSet, dict[str, Any]]:
        """Measure the baselines, then evolve, within the budgets; the factor set to write (labelled by
        `verdict`) and a summary. The time budget counts from here, baselines included, and is checked
        before every document evaluation. `on_evaluation` is called per finished document evaluation
        (replayed ones too), `on_best` with each new best perplexity of the search."""
        started = time.perf_counter()
        fitness = ModelFitness(self.model, self.documents, self.log, self.workers, self.task, self.plan.scored)
        evolution = Evolution(self.task.space, self.task.initial, self.preset, fitness, seed=self.seed,
                              max_evals=self.max_evals, on_evaluation=on_evaluation, on_best=on_best)
        # what comes after the evolution: the finalists' confirmation, the other attention scales, the needle ranking
        final_forwards = ((evolution.reserve + max(len(self.task.attention_scales) - 1, 0)) * len(self.documents)
                          + self.plan.needle_ranking_forwards)

        def keep_going(reserve: float = 0.0) -> bool:
            """Within the time budget, leaving `reserve` forwards' worth of time (at the mean time of those computed)."""
            if self.time_budget is None:
                return True
            per_forward = fitness.seconds / fitness.computed if fitness.computed else 0.0
            return time.perf_counter() - started + reserve * per_forward < self.time_budget

        evolution.keep_going, evolution.keep_confirming = lambda: keep_going(final_forwards), keep_going
        sets = baseline_sets(self.task) if self.baselines else {}
        baselines = baseline_perplexities(sets, fitness, keep_going, on_evaluation)
        result = evolution.run()
        needle_ranking = {}
        if self.plan.objective == "ppl+needle" and result.best is not None:
            result, needle_ranking = self.rank_on_needles(evolution, result, keep_going, on_evaluation)
        attention_scales = measured_attention_scales(self.task, fitness, result, keep_going, on_evaluation)
        if result.best is not None:
            searched, searched_perplexity = searched_factor_set(self.task, result, attention_scales)
            result = replace(result, best_perplexity=searched_perplexity)
        self.workers.close()
        seconds = time.perf_counter() - started
        scored = [nll for nll, _ in self.log.known.values()]
        if result.best is None and scored and not any(math.isfinite(nll) for nll in scored):
            raise LongRoPEError(f"every evaluation ({len(scored)} documents) gave a NaN or infinite perplexity: the "
                                "model's logits are not finite (check its weights and dtype); nothing to write")
        outcome = verdict(result, baselines, self.task.long_mode, OBJECTIVE_LABELS[self.plan.objective])
        if outcome.warning:
            self.status(f"warning: {outcome.warning}")
        written = sets[outcome.baseline] if outcome.baseline else searched
        best_perplexity = baselines[outcome.baseline] if outcome.baseline else result.best_perplexity
        provenance = {
            "source": self.source.name,
            "data": data_provenance(self.data),
            "documents": len(self.documents),
            "eval_length": self.eval_length,
            "evaluations": provenance_count(result.evaluations),
            "best_perplexity": round(best_perplexity, 4),
            "baseline_perplexities": {name: round(ppl, 4) for name, ppl in baselines.items()},
            "preset": self.preset_name,
            **({"objective": {**self.plan.needles.settings, **needle_ranking}} if self.plan.needles else {}),
            "space": ({"name": "critical", "critical_dimension": self.task.space.critical} if self.task.space.critical
                      else {"name": "full"}),
            **({"windows": [portable_document_name(name, self.data) for name in self.document_names]}
               if any("#window" in name for name in self.document_names) else {}),
            "budget": {"max_evals": None if self.max_evals is None else provenance_count(self.max_evals),
                       "time_budget_s": self.time_budget,
                       "seconds_this_run": round(seconds, 1), "stopped_by": result.stopped_by},
            "seed": self.seed,
            **({"warning": outcome.warning} if outcome.warning else {}),
        }
        if "composition" in written.provenance:  # what the set is composed on (factors.compose)
            provenance["composition"] = written.provenance["composition"]
        factor_set = replace(written, provenance=new_provenance(outcome.method, **provenance))
        summary = {"method": outcome.method, "warning": outcome.warning, "objective": self.plan.objective,
                   "best_perplexity": best_perplexity,
                   "search_best_perplexity": result.best_perplexity, "evaluations": result.evaluations,
                   "iterations": result.iterations, "stopped_by": result.stopped_by, "n_hat": factor_set.n_hat,
                   "baselines": baselines, "history": result.history, "seconds": seconds,
                   "finalists": [(perplexity, candidate.key) for perplexity, candidate in result.finalists],
                   **({"needle_ranking": needle_ranking["ranked"]} if needle_ranking else {})}
        return factor_set, summary

    def rank_on_needles(self, evolution: Evolution, result: SearchResult, keep_going: Callable[[], bool],
                        on_evaluation: Callable[[], None]) -> tuple[SearchResult, dict[str, Any]]:
        """"ppl+needle": the NEEDLE_FINALISTS fittest by perplexity on every document (the evolution's finalists,
        else its best scores) ranked on the needle items (evolution.rank_finalists, logged as "needle:<key>"); the
        winner with its perplexity, and the ranking for the factor file. When keep_going() stops it before any
        finalist is scored, the perplexity's best stays."""
        needles = self.plan.needles
        by_perplexity = result.finalists or sorted(
            (score, candidate) for candidate, score in evolution.scores.items() if math.isfinite(score))
        perplexity = {candidate: score for score, candidate in by_perplexity[:NEEDLE_FINALISTS]}
        fitness = ModelFitness(self.model, needles.tokens, self.log, self.workers, self.task, needles.scored,
                               key_prefix="needle:")
        ranked = rank_finalists(list(perplexity), fitness, range(fitness.documents), {}, keep_going, on_evaluation)
        if not ranked:
            return result, {}
        winner = ranked[0][1]
        return (replace(result, best=winner, best_perplexity=perplexity[winner]),
                {"ranked": [{"candidate": candidate.key, "answer_perplexity": round(answer, 4),
                             "perplexity": round(perplexity[candidate], 4)} for answer, candidate in ranked]})

    @property
    def is_main(self) -> bool:
        return self.workers.is_main
