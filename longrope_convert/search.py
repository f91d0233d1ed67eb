"""The search of LongRoPE factors (lambda and n_hat) for a model: task, fitness, baselines, the run.

Fitness: perplexity of the model with a candidate's factors over K documents of the evaluation
length (each: BOS + its first length - 1 tokens), exp(total NLL / total tokens). The model is
loaded once and every candidate is swapped into its rotary embedding in place (the module that
ships in checkpoints). Documents longer than the original window use the long set; a short-factor
search evaluates at the original window, where the short set is in use.

The evolution itself (space, operators, presets, budgets) is in evolution.py, the JSONL log and
resume in search_log.py, the spreading of evaluations over torchrun processes in workers.py.
Initial population: the PI, NTK, YaRN and llama3 sets on the grid, then mutants of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import LongRoPEError
from .evolution import N_HAT_CHOICES, NLL, PRESETS, Candidate, Evolution, SearchResult, SearchSpace, perplexity_of
from .factors import (
    ANALYTIC_METHODS,
    FactorSet,
    ModelFingerprint,
    analytic_factors,
    baseline_factor_sets,
    compose,
    new_provenance,
    source_factor_set,
)
from .perplexity import token_nll, use_factor_set
from .search_log import LOG_VERSION, SearchLog
from .source_rope import long_attention_scales
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


def long_search_task(model: ModelFingerprint, target: int, n_hat: bool, high: float | None = None) -> SearchTask:
    """Search long factors for `target` relative to the source's own (factors.compose): lambda within
    [1, high or 1.25 s] for the extension s = target / the length the source already serves, starting from the
    analytic sets for that extension. Raises LongRoPEError for a target the source already reaches."""
    base_set = source_factor_set(model, target)
    base = model.base_factor_set()
    reach = base.max_position_embeddings
    scale = target / reach
    # n_hat applies to both sets: when the short set is not exactly the source's angles (a LongRoPE source's own
    # short factors), another n_hat would change the model inside its window, so the source's is kept.
    searched_n_hat = n_hat and base.short_is_source_rope
    space = SearchSpace.from_bounds(model.head_dim // 2, 1.0, high or 1.25 * scale,
                                    N_HAT_CHOICES if searched_n_hat else (base.n_hat,))
    initial = [space.snap(analytic_factors(method, scale, model.head_dim, model.rope_theta, reach)[0], base.n_hat)
               for method in ANALYTIC_METHODS]
    return SearchTask(base=base_set, long_mode=True, space=space, initial=initial,
                      attention_scales=long_attention_scales(base, target))


def short_search_task(checkpoint: FactorSet, high: float | None = None) -> SearchTask:
    """Search short factors of a LongRoPE checkpoint at its original window (n_hat kept)."""
    dims = len(checkpoint.short_factor)
    space = SearchSpace.from_bounds(dims, 1.0, high or 2.0, (checkpoint.n_hat,))
    initial = [space.snap(checkpoint.short_factor, checkpoint.n_hat), space.snap([1.0] * dims, checkpoint.n_hat)]
    return SearchTask(base=checkpoint, long_mode=False, space=space, initial=initial)


def document_nll(model, factor_set: FactorSet, input_ids: torch.Tensor) -> NLL:
    """(sum of token NLLs, tokens) of one document [1, length] under a factor set swapped into the model."""
    use_factor_set(model, factor_set)  # the document's length selects the long or short set
    nll = token_nll(model, input_ids)
    return math.fsum(nll.double().flatten().tolist()), nll.numel()


class ModelFitness:
    """NLL of factor sets on the search documents: replayed from the log when known, computed otherwise
    (spread over the torchrun processes). Implements evolution.Fitness for the task's candidates."""

    def __init__(self, model, token_ids: list[torch.Tensor], log: SearchLog, workers: Workers,
                 task: SearchTask) -> None:
        self.model, self.token_ids, self.log, self.workers, self.task = model, token_ids, log, workers, task
        self.documents = len(token_ids)

    def nll(self, requests: Sequence[tuple[Candidate, int]],
            on_result: Callable[[Candidate, int, NLL], None]) -> None:
        self.evaluate([(c, c.key, self.task.factor_set(c), doc) for c, doc in requests], on_result)

    def evaluate(self, requests: Sequence[tuple[Any, str, FactorSet, int]],
                 on_result: Callable[[Any, int, NLL], None]) -> None:
        """(item, log key, factor set, document) requests; on_result(item, document, NLL) as each finishes."""
        todo = []
        for item, key, factor_set, doc in requests:
            if (key, doc) in self.log.known:
                on_result(item, doc, self.log.known[(key, doc)])
            else:
                todo.append((item, key, factor_set, doc))

        def compute(request) -> tuple[float, int, float]:
            _, _, factor_set, doc = request
            started = time.perf_counter()
            return *document_nll(self.model, factor_set, self.token_ids[doc]), time.perf_counter() - started

        def record(request, result) -> None:
            item, key, _, doc = request
            nll_sum, tokens, seconds = result
            self.log.append(key, doc, nll_sum, tokens, seconds)
            on_result(item, doc, (nll_sum, tokens))

        self.workers.map(compute, todo, record)

    def perplexity(self, key: str, factor_set: FactorSet, on_evaluation: Callable[[], None]) -> float:
        """Perplexity of one factor set (a baseline) on all documents, logged under `key`."""
        results = {}

        def record(_, doc: int, nll: NLL) -> None:
            results[doc] = nll
            on_evaluation()

        self.evaluate([(key, key, factor_set, doc) for doc in range(self.documents)], record)
        return perplexity_of(results.values())


def baseline_perplexities(task: SearchTask, fitness: ModelFitness,
                          on_evaluation: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Perplexity of the source's own RoPE carried past its window and of the classic sets composed on it
    (factors.baseline_factor_sets), at their own attention scales, on the same data."""
    if not task.long_mode:
        return {"before": fitness.perplexity("baseline:checkpoint", task.base, on_evaluation)}
    sets = baseline_factor_sets(task.base.model, task.base.target_length)
    return {name: fitness.perplexity(f"baseline:{name}", factor_set, on_evaluation)
            for name, factor_set in sets.items()}


def measured_attention_scales(task: SearchTask, fitness: ModelFitness, result: SearchResult,
                              on_evaluation: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """The best candidate's perplexity at each attention scale the task considers ({rule: {"long_mscale",
    "perplexity"}}): the evolution's own for the first, one more evaluation for each other."""
    measured = {}
    for rule, long_mscale in task.attention_scales.items():
        if not measured:
            perplexity = result.best_perplexity
        else:
            factor_set = replace(task.factor_set(result.best), long_mscale=long_mscale)
            perplexity = fitness.perplexity(f"attention:{rule}:{result.best.key}", factor_set, on_evaluation)
        measured[rule] = {"long_mscale": long_mscale, "perplexity": perplexity}
    return measured


def search_log_header(source_name: str, task: SearchTask, documents: list[str], skipped_documents: int,
                      eval_length: int, seed: int, preset_name: str, budget: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": LOG_VERSION,
        "source": source_name,
        "model": asdict(task.base.model),
        "mode": "long" if task.long_mode else "short",
        "target_length": task.base.target_length,
        "base_long_factor": task.base.long_factor,
        "space": asdict(task.space),
        "documents": documents,
        "skipped_documents": skipped_documents,  # shorter than the evaluation length
        "eval_length": eval_length,
        "seed": seed,
        "preset": preset_name,
        "budget": budget,
    }


def result_factor_set(task: SearchTask, result: SearchResult, provenance: dict[str, Any],
                      attention_scales: dict[str, dict[str, float]] | None = None) -> FactorSet:
    """The best candidate's factor set with its provenance; in long mode at the attention scale that measured
    best among `attention_scales` (measured_attention_scales), recorded in the composition provenance."""
    method = "search" if task.long_mode else "search:short"
    best = task.factor_set(result.best)
    if not attention_scales or "composition" not in best.provenance:  # a source without RoPE scaling: one rule
        return replace(best, provenance=new_provenance(method, **provenance))
    rule = min(attention_scales, key=lambda name: attention_scales[name]["perplexity"])
    measured = {name: {**scale, "perplexity": round(scale["perplexity"], 4)}
                for name, scale in attention_scales.items()}
    composition = {**best.provenance["composition"], "attention_scale": rule, "attention_scales": measured}
    return replace(best, long_mscale=attention_scales[rule]["long_mscale"],
                   provenance=new_provenance(method, **provenance, composition=composition))


class SearchRun:
    """A search made ready (task, documents, model, log), then run; what the `search` command drives."""

    def __init__(self, source, data: list[str], target: int | None, documents: int = 4, preset: str = "default",
                 max_evals: float | None = None, time_budget: float | None = None, seed: int = 0,
                 n_hat: bool = True, short: bool = False, max_factor: float | None = None,
                 log_path: Path | None = None, resume: bool = False, baselines: bool = True,
                 status: Callable[[str], None] = lambda message: None) -> None:
        from transformers import AutoTokenizer

        from .convert import longrope_config
        from .perplexity import load_longrope_model, read_documents, tokenized_documents

        self.workers = Workers()
        self.status = status if self.workers.is_main else (lambda message: None)
        self.source, self.preset_name, self.preset = source, preset, PRESETS[preset]
        self.max_evals, self.time_budget, self.seed, self.baselines = max_evals, time_budget, seed, baselines
        self.task, self.eval_length = self._task(source, target, short, n_hat, max_factor)
        self.data = list(data)
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
        self.documents, self.document_names, skipped = tokenized_documents(
            tokenizer, read_documents(self.data), self.eval_length, limit=documents)
        self.status(f"data: {len(self.documents)} documents of {self.eval_length} tokens "
                    f"({skipped} shorter documents skipped)")
        if not self.documents:
            raise LongRoPEError(f"--data has no document of at least {self.eval_length} tokens "
                                f"({skipped} shorter ones skipped)")
        budget = {"max_evals": max_evals, "time_budget": time_budget}
        header = search_log_header(source.name, self.task, self.document_names, skipped, self.eval_length, seed,
                                   preset, budget)
        self.log = SearchLog(log_path, header, resume, self.workers)
        self.status(f"model: loading {source.folder} on {self.workers.device} "
                    f"({self.workers.world} process{'es' if self.workers.world > 1 else ''})")
        self.model = load_longrope_model(source.folder, longrope_config(source.config, self.task.base),
                                         self.workers.device)

    @staticmethod
    def _task(source, target: int | None, short: bool, n_hat: bool, max_factor: float | None):
        stage = source.longrope
        if short:
            if stage is None:
                raise LongRoPEError("--short searches the short factors of a LongRoPE checkpoint; "
                                    f"'{source.folder}' is a plain model (its short factors are 1.0)")
            if target not in (None, stage.target_length):
                raise LongRoPEError(f"--short keeps the checkpoint's target {stage.target_length}; drop --target")
            return short_search_task(stage, max_factor), stage.model.original_max_position_embeddings
        if target is None:
            raise LongRoPEError("--target is required (except with --short)")
        return long_search_task(source.fingerprint, target, n_hat, max_factor), target

    @property
    def planned_document_evaluations(self) -> int:
        preset = self.preset
        evaluations = preset.population + preset.iterations * (preset.mutations + preset.crossovers)
        if self.max_evals is not None:
            evaluations = min(evaluations, math.ceil(self.max_evals))
        if self.baselines:
            evaluations += 1 + len(ANALYTIC_METHODS) if self.task.long_mode else 1
        evaluations += max(len(self.task.attention_scales) - 1, 0)
        return evaluations * len(self.documents)

    def execute(self, on_document: Callable[[], None] = lambda: None,
                on_best: Callable[[float], None] = lambda ppl: None) -> tuple[FactorSet, dict[str, Any]]:
        started = time.perf_counter()
        fitness = ModelFitness(self.model, self.documents, self.log, self.workers, self.task)
        evolution = Evolution(self.task.space, self.task.initial, self.preset, fitness, seed=self.seed,
                              max_evals=self.max_evals, time_budget=self.time_budget, on_evaluation=on_document,
                              on_best=on_best)
        result = evolution.run()
        attention_scales = measured_attention_scales(self.task, fitness, result, on_document)
        best_perplexity = min((m["perplexity"] for m in attention_scales.values()), default=result.best_perplexity)
        baselines = baseline_perplexities(self.task, fitness, on_document) if self.baselines else {}
        seconds = time.perf_counter() - started
        provenance = {
            "source": self.source.name,
            "data": self.data,
            "documents": len(self.documents),
            "eval_length": self.eval_length,
            "evaluations": round(result.evaluations, 2),
            "best_perplexity": round(best_perplexity, 4),
            "baseline_perplexities": {name: round(ppl, 4) for name, ppl in baselines.items()},
            "preset": self.preset_name,
            "budget": {"max_evals": self.max_evals, "time_budget_s": self.time_budget,
                       "seconds_this_run": round(seconds, 1)},
            "seed": self.seed,
        }
        factor_set = result_factor_set(self.task, result, provenance, attention_scales)
        summary = {"best_perplexity": best_perplexity, "evaluations": result.evaluations,
                   "n_hat": result.best.n_hat, "baselines": baselines, "history": result.history,
                   "seconds": seconds}
        self.workers.close()
        return factor_set, summary

    @property
    def is_main(self) -> bool:
        return self.workers.is_main
