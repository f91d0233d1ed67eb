"""Evolutionary search of LongRoPE factors (lambda and n_hat) that works on current transformers.

Fitness: perplexity of the model with a candidate's factors over K documents of the evaluation
length (each: BOS + its first length - 1 tokens), exp(total NLL / total tokens). The model is
loaded once and every candidate is swapped into its rotary embedding in place (the module that
ships in checkpoints). Documents longer than the original window use the long set; a short-factor
search evaluates at the original window, where the short set is in use.

Search space: lambda_i on a 0.01 grid within [low, high] (default [1, 1.25 s]), non-decreasing in
i; n_hat from N_HAT_CHOICES. Operators, as in LongRoPE's official search:
  mutation   each dimension with probability p is redrawn uniformly between its neighbours'
             values (children stay monotone); n_hat moves to a neighbouring choice with probability p
  crossover  each dimension comes from the second parent with probability p_c, n_hat from either;
             non-monotone or already-evaluated children are redrawn (20 tries, then a mutation)
Initial population: the PI, NTK, YaRN and llama3 sets on the grid, then mutants of them.
Presets:
  paper    population 64, 32 parents, 16 mutations + 16 crossovers per iteration, 40 iterations,
           p = 0.3, p_c = 0.3 x 0.5 (microsoft/LongRoPE's dim_mono hyper-parameters)
  default  population 16, 3 parents, 12 mutations + 4 crossovers, p = 0.15, up to 60 iterations,
           stop after 10 without improvement; each child is first scored on one document and
           finishes only if it would rank among the parents there ("racing")

Evaluations are pure functions of (candidate, document). Each is appended to a JSONL log as it
finishes; a resumed search replays the log instead of recomputing, so it ends where the
uninterrupted search would have. Under torchrun every rank runs the same search and the
evaluations of each round are spread over the ranks (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import LongRoPEError
from .factors import ANALYTIC_METHODS, FactorSet, analytic_factor_set, new_provenance
from .modeling_longrope_llama import N_HAT_CHOICES, default_long_mscale
from .perplexity import token_nll, use_factor_set

GRID = 0.01
LOG_VERSION = 1


@dataclass(frozen=True)
class Preset:
    population: int
    parents: int
    mutations: int
    crossovers: int
    iterations: int
    mutation_p: float
    crossover_p: float
    racing: bool  # score each child on one document first; finish it only if it would rank among the parents
    patience: int | None  # stop after this many iterations without improvement


PRESETS = {
    # microsoft/LongRoPE evolution/default_hyper_params/dim_mono_llama.json and algorithms/dim_mono.py
    "paper": Preset(population=64, parents=32, mutations=16, crossovers=16, iterations=40, mutation_p=0.3,
                    crossover_p=0.3 * 0.5, racing=False, patience=None),
    # Tuned on the tiny testbed (benchmarks/search_efficiency.py): few parents and mostly mutations
    # exploit faster; racing spends a fraction of an evaluation on children that would not be parents.
    "default": Preset(population=16, parents=3, mutations=12, crossovers=4, iterations=60, mutation_p=0.15,
                      crossover_p=0.3 * 0.5, racing=True, patience=10),
}


@dataclass(frozen=True, order=True)
class Candidate:
    steps: tuple[int, ...]  # lambda_i / GRID
    n_hat: int

    @property
    def factors(self) -> list[float]:
        return [round(step * GRID, 10) for step in self.steps]

    @property
    def key(self) -> str:
        return f"n{self.n_hat}:" + ",".join(map(str, self.steps))


@dataclass(frozen=True)
class SearchSpace:
    dims: int
    low: int  # grid steps
    high: int
    n_hat_choices: tuple[int, ...]

    @classmethod
    def from_bounds(cls, dims: int, low: float, high: float, n_hat_choices=N_HAT_CHOICES) -> SearchSpace:
        if not 1.0 <= low <= high:
            raise LongRoPEError(f"factor bounds must satisfy 1 <= low <= high, got [{low}, {high}]")
        return cls(dims, round(low / GRID), round(high / GRID), tuple(n_hat_choices))

    def snap(self, factors: list[float], n_hat: int = 0) -> Candidate:
        """The nearest candidate: on the grid, within bounds, non-decreasing, n_hat among the choices."""
        steps, floor = [], self.low
        for factor in factors:
            floor = min(max(round(factor / GRID), floor), self.high)
            steps.append(floor)
        return Candidate(tuple(steps), min(self.n_hat_choices, key=lambda choice: abs(choice - n_hat)))

    def contains(self, candidate: Candidate) -> bool:
        steps = candidate.steps
        return (len(steps) == self.dims and all(self.low <= s <= self.high for s in steps)
                and all(a <= b for a, b in zip(steps, steps[1:])) and candidate.n_hat in self.n_hat_choices)

    def mutate(self, parent: Candidate, rng: random.Random, p: float) -> Candidate:
        steps = list(parent.steps)
        for i in range(self.dims):
            if rng.random() < p:
                lower = steps[i - 1] if i > 0 else self.low
                upper = steps[i + 1] if i < self.dims - 1 else self.high
                steps[i] = rng.randint(lower, upper)
        n_hat = parent.n_hat
        if len(self.n_hat_choices) > 1 and rng.random() < p:
            index = self.n_hat_choices.index(n_hat) + rng.choice((-1, 1))
            n_hat = self.n_hat_choices[min(max(index, 0), len(self.n_hat_choices) - 1)]
        return Candidate(tuple(steps), n_hat)

    def crossover(self, first: Candidate, second: Candidate, rng: random.Random, p: float) -> Candidate:
        steps = tuple(b if rng.random() < p else a for a, b in zip(first.steps, second.steps))
        return Candidate(steps, second.n_hat if rng.random() < 0.5 else first.n_hat)


class Workers:
    """The processes of a torchrun launch (or just this one): rank 0 writes, all compute."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def map(self, function: Callable[[Any], Any], items: list, on_result: Callable[[Any, Any], None]) -> list:
        """function(item) for every item, in rounds of one item per rank; on_result(item, result) in order."""
        results = []
        for start in range(0, len(items), self.world):
            chunk = items[start : start + self.world]
            mine = function(chunk[self.rank]) if self.rank < len(chunk) else None
            if self.world > 1:
                gathered = [None] * self.world
                torch.distributed.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            for item, result in zip(chunk, gathered):
                on_result(item, result)
                results.append(result)
        return results

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class SearchLog:
    """JSONL: a header with the search's settings, then one line per (setting, document) evaluation."""

    def __init__(self, path: Path, header: dict[str, Any], resume: bool, workers: Workers) -> None:
        self.path, self.writer = path, workers.is_main
        self.known: dict[tuple[str, int], tuple[float, int]] = {}
        header = json.loads(json.dumps(header))  # tuples become lists, as when read back
        if resume:
            self._replay(header)
        elif path.exists():
            raise LongRoPEError(f"search log '{path}' exists; pass --resume {path} to continue it, or remove it")
        workers.barrier()  # every rank has looked at the log before rank 0 writes it
        if self.writer and not resume:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"kind": "header", **header}) + "\n")

    def _replay(self, header: dict[str, Any]) -> None:
        try:
            lines = self.path.read_text().splitlines()
            logged = json.loads(lines[0])
        except (OSError, IndexError, ValueError):
            raise LongRoPEError(f"--resume {self.path}: not a search log") from None
        logged.pop("kind", None)
        for field, value in header.items():
            if field != "budget" and logged.get(field) != value:
                raise LongRoPEError(f"--resume {self.path}: the log was made with a different '{field}' "
                                    f"({logged.get(field)!r}); resume with the same settings")
        self.known.update(logged_evaluations(lines[1:]))

    def append(self, setting: str, doc: int, nll_sum: float, tokens: int, seconds: float) -> None:
        self.known[(setting, doc)] = (nll_sum, tokens)
        if self.writer:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"kind": "eval", "setting": setting, "doc": doc, "nll_sum": nll_sum,
                                         "tokens": tokens, "seconds": round(seconds, 3)}) + "\n")


def logged_evaluations(lines: list[str]) -> dict[tuple[str, int], tuple[float, int]]:
    """(setting, document) -> (NLL sum, tokens) from a search log's evaluation lines."""
    known = {}
    for line in lines:
        try:
            entry = json.loads(line)
            known[(entry["setting"], entry["doc"])] = (entry["nll_sum"], entry["tokens"])
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by a kill: the evaluation in flight is recomputed
    return known


class Fitness:
    """NLL of factor sets on the documents: replayed from the log when known, computed otherwise."""

    def __init__(self, model, documents: list[torch.Tensor], log: SearchLog, workers: Workers,
                 on_document: Callable[[], None] = lambda: None) -> None:
        self.model, self.documents = model, documents
        self.log, self.workers, self.on_document = log, workers, on_document
        self.requested: set[tuple[str, int]] = set()  # replayed ones count too: a resumed search stops alike

    @property
    def evaluations(self) -> float:
        """Evaluations done so far, in units of one candidate on all documents."""
        return len(self.requested) / len(self.documents)

    def nll(self, requests: list[tuple[str, FactorSet, int]]) -> dict[tuple[str, int], tuple[float, int]]:
        todo = [(key, factor_set, doc) for key, factor_set, doc in requests if (key, doc) not in self.log.known]

        def compute(request):
            _, factor_set, doc = request
            started = time.perf_counter()
            use_factor_set(self.model, factor_set)  # the document's length selects the long or short set
            nll = token_nll(self.model, self.documents[doc])
            return math.fsum(nll.double().flatten().tolist()), nll.numel(), time.perf_counter() - started

        def record(request, result):
            key, _, doc = request
            self.log.append(key, doc, *result)

        self.workers.map(compute, todo, record)
        for key, _, doc in requests:
            if (key, doc) not in self.requested:
                self.requested.add((key, doc))
                self.on_document()
        return {(key, doc): self.log.known[(key, doc)] for key, _, doc in requests}

    def perplexity(self, key: str, factor_set: FactorSet, docs: range | None = None) -> float:
        docs = range(len(self.documents)) if docs is None else docs
        results = self.nll([(key, factor_set, doc) for doc in docs])
        return _perplexity(results.values())


def _perplexity(results) -> float:
    results = list(results)
    return math.exp(math.fsum(nll for nll, _ in results) / sum(tokens for _, tokens in results))


@dataclass
class SearchTask:
    """What to search: the model's starting factor set and how candidates map onto it."""

    base: FactorSet  # long mode: lambda_total = base.long_factor * lambda; short mode: short_factor = lambda
    long_mode: bool
    space: SearchSpace
    initial: list[Candidate]

    def factor_set(self, candidate: Candidate) -> FactorSet:
        if self.long_mode:
            long_factor = [b * f for b, f in zip(self.base.long_factor, candidate.factors)]
            return replace(self.base, long_factor=long_factor, n_hat=candidate.n_hat)
        return replace(self.base, short_factor=candidate.factors)


def long_search_task(base: FactorSet, stage_target: int, target: int, n_hat: bool,
                     high: float | None = None) -> SearchTask:
    """Search long factors for `target`, relative to `base` (identity for a plain model; the first
    stage's long factors when extending a LongRoPE checkpoint that reached `stage_target`)."""
    scale = target / stage_target
    dims = len(base.long_factor)
    space = SearchSpace.from_bounds(dims, 1.0, high or 1.25 * scale, N_HAT_CHOICES if n_hat else (0,))
    stage = replace(base.model, original_max_position_embeddings=stage_target)
    initial = [space.snap(analytic_factor_set(method, stage, target).long_factor) for method in ANALYTIC_METHODS]
    total = replace(base, target_length=target, long_mscale=default_long_mscale(
        target / base.model.original_max_position_embeddings, base.model.original_max_position_embeddings))
    return SearchTask(base=total, long_mode=True, space=space, initial=initial)


def short_search_task(checkpoint: FactorSet, high: float | None = None) -> SearchTask:
    """Search short factors of a LongRoPE checkpoint at its original window (n_hat kept)."""
    dims = len(checkpoint.short_factor)
    space = SearchSpace.from_bounds(dims, 1.0, high or 2.0, (checkpoint.n_hat,))
    initial = [space.snap(checkpoint.short_factor, checkpoint.n_hat), space.snap([1.0] * dims, checkpoint.n_hat)]
    return SearchTask(base=checkpoint, long_mode=False, space=space, initial=initial)


@dataclass
class SearchResult:
    best: Candidate
    best_perplexity: float
    history: list[tuple[float, float]]  # (evaluations so far, best perplexity so far)
    evaluations: float


def evolve(task: SearchTask, preset: Preset, fitness: Fitness, seed: int, max_evals: float | None = None,
           time_budget: float | None = None, on_best: Callable[[float], None] = lambda ppl: None) -> SearchResult:
    """(mu + lambda) evolution over the task's search space; deterministic for a given seed."""
    rng = random.Random(seed)
    space, docs = task.space, len(fitness.documents)
    started = time.perf_counter()
    scores: dict[Candidate, float] = {}  # full-fitness perplexity; inf for children raced out
    probe: dict[Candidate, float] = {}  # mean NLL on document 0
    history: list[tuple[float, float]] = []
    best = [math.inf]

    def out_of_budget(cost: float = 0.0) -> bool:
        over_evals = max_evals is not None and fitness.evaluations + cost > max_evals + 1e-9
        return over_evals or (time_budget is not None and time.perf_counter() - started > time_budget)

    def score(candidates: list[Candidate], race_against: list[Candidate] | None) -> None:
        candidates = [c for c in candidates if c not in scores]
        if race_against is not None and docs > 1:
            results = fitness.nll([(c.key, task.factor_set(c), 0) for c in candidates])
            for candidate in candidates:
                nll, tokens = results[(candidate.key, 0)]
                probe[candidate] = nll / tokens
            bar = sorted(probe[p] for p in race_against)[min(preset.parents, len(race_against)) - 1]
            finalists = [c for c in candidates if probe[c] <= bar]
            scores.update((c, math.inf) for c in candidates if probe[c] > bar)
        else:
            finalists = candidates
        requests = [(c.key, task.factor_set(c), doc) for c in finalists for doc in range(docs)]
        results = fitness.nll(requests)
        for candidate in finalists:
            scores[candidate] = _perplexity(results[(candidate.key, doc)] for doc in range(docs))
            probe[candidate] = results[(candidate.key, 0)][0] / results[(candidate.key, 0)][1]
            if scores[candidate] < best[0]:
                best[0] = scores[candidate]
                on_best(best[0])
            history.append((fitness.evaluations, best[0]))

    def fit(candidates: list[Candidate]) -> list[Candidate]:
        """As many candidates as the evaluation budget allows (each may cost a full evaluation)."""
        if max_evals is None:
            return candidates
        room = math.floor(max_evals - fitness.evaluations + 1e-9)
        return candidates[: max(room, 0)]

    def new_child(make: Callable[[], Candidate], seen: set[Candidate]) -> Candidate | None:
        for _ in range(100):
            child = make()
            if child not in seen and space.contains(child):
                seen.add(child)
                return child
        return None

    seen: set[Candidate] = set()
    population = []
    for candidate in task.initial:
        if candidate not in seen:
            seen.add(candidate)
            population.append(candidate)
    while len(population) < preset.population:
        child = new_child(lambda: space.mutate(rng.choice(task.initial), rng, preset.mutation_p), seen)
        if child is None:
            break
        population.append(child)
    score(fit(population), race_against=None)
    population = [c for c in population if c in scores]

    stale = 0
    for _ in range(preset.iterations):
        if out_of_budget(cost=1.0):
            break
        parents = sorted(population, key=lambda c: (scores[c], c))[: preset.parents]
        children = []
        for _ in range(preset.mutations):
            child = new_child(lambda: space.mutate(rng.choice(parents), rng, preset.mutation_p), seen)
            children += [child] if child else []
        for _ in range(preset.crossovers):
            first, second = sorted(rng.sample(parents, 2)) if len(parents) > 1 else (parents[0], parents[0])
            child = new_child(lambda: space.crossover(first, second, rng, preset.crossover_p), seen)
            child = child or new_child(lambda: space.mutate(first, rng, preset.mutation_p), seen)
            children += [child] if child else []
        before = best[0]
        children = fit(children)
        score(children, race_against=parents if preset.racing else None)
        population = parents + [c for c in children if math.isfinite(scores.get(c, math.inf))]
        stale = 0 if best[0] < before * (1 - 1e-4) else stale + 1
        if preset.patience is not None and stale >= preset.patience:
            break
    winner = min((c for c in scores if math.isfinite(scores[c])), key=lambda c: (scores[c], c))
    return SearchResult(best=winner, best_perplexity=scores[winner], history=history, evaluations=fitness.evaluations)


def baseline_perplexities(task: SearchTask, fitness: Fitness) -> dict[str, float]:
    """Perplexity of the classic sets at their own attention scale, and of no scaling, on the same data."""
    if not task.long_mode:
        return {"before": fitness.perplexity("baseline:checkpoint", task.base)}
    stage = task.base.model
    sets = {"none": replace(task.base, long_factor=[1.0] * task.space.dims, n_hat=0, long_mscale=1.0)}
    for method in ANALYTIC_METHODS:
        analytic = analytic_factor_set(method, stage, task.base.target_length)
        sets[method] = replace(task.base, long_factor=analytic.long_factor, n_hat=0, long_mscale=analytic.long_mscale)
    return {name: fitness.perplexity(f"baseline:{name}", factor_set) for name, factor_set in sets.items()}


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


def result_factor_set(task: SearchTask, result: SearchResult, provenance: dict[str, Any]) -> FactorSet:
    method = "search" if task.long_mode else "search:short"
    return replace(task.factor_set(result.best), provenance=new_provenance(method, **provenance))


class SearchRun:
    """A search made ready (task, documents, model, log), then run; what the `search` command drives."""

    def __init__(self, source, data: list[str], target: int | None, documents: int = 4, preset: str = "default",
                 max_evals: float | None = None, time_budget: float | None = None, seed: int = 0,
                 n_hat: bool = True, short: bool = False, max_factor: float | None = None,
                 log_path: Path | None = None, resume: bool = False, baselines: bool = True,
                 status: Callable[[str], None] = lambda message: None) -> None:
        from transformers import AutoTokenizer

        from .convert import longrope_config
        from .documents import read_documents
        from .perplexity import load_longrope_model, tokenized_documents
        from .preflight import check_search_inputs

        check_search_inputs(source, data, log_path, resume)
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
        if stage is None:
            half = source.fingerprint.head_dim // 2
            stage = FactorSet(model=source.fingerprint, target_length=source.original_window,
                              long_factor=[1.0] * half, short_factor=[1.0] * half)
            stage_target = source.original_window
        else:
            stage_target = stage.target_length
        if target <= stage_target:
            raise LongRoPEError(f"--target {target} must be larger than the source's context window {stage_target}")
        return long_search_task(stage, stage_target, target, n_hat, max_factor), target

    @property
    def planned_document_evaluations(self) -> int:
        preset = self.preset
        evaluations = preset.population + preset.iterations * (preset.mutations + preset.crossovers)
        if self.max_evals is not None:
            evaluations = min(evaluations, math.ceil(self.max_evals))
        if self.baselines:
            evaluations += 1 + len(ANALYTIC_METHODS) if self.task.long_mode else 1
        return evaluations * len(self.documents)

    def execute(self, on_document: Callable[[], None] = lambda: None,
                on_best: Callable[[float], None] = lambda ppl: None) -> tuple[FactorSet, dict[str, Any]]:
        started = time.perf_counter()
        fitness = Fitness(self.model, self.documents, self.log, self.workers, on_document)
        result = evolve(self.task, self.preset, fitness, self.seed, self.max_evals, self.time_budget, on_best)
        baselines = baseline_perplexities(self.task, fitness) if self.baselines else {}
        seconds = time.perf_counter() - started
        provenance = {
            "source": self.source.name,
            "data": self.data,
            "documents": len(self.documents),
            "eval_length": self.eval_length,
            "evaluations": round(result.evaluations, 2),
            "best_perplexity": round(result.best_perplexity, 4),
            "baseline_perplexities": {name: round(ppl, 4) for name, ppl in baselines.items()},
            "preset": self.preset_name,
            "budget": {"max_evals": self.max_evals, "time_budget_s": self.time_budget,
                       "seconds_this_run": round(seconds, 1)},
            "seed": self.seed,
        }
        if self.task.long_mode and self.source.longrope is not None:
            stage = self.source.longrope
            provenance["base_factors"] = {"method": stage.method, "target_length": stage.target_length,
                                          "long_factor": stage.long_factor}
        factor_set = result_factor_set(self.task, result, provenance)
        summary = {"best_perplexity": result.best_perplexity, "evaluations": result.evaluations,
                   "n_hat": result.best.n_hat, "baselines": baselines, "history": result.history,
                   "seconds": seconds}
        self.workers.close()
        return factor_set, summary

    @property
    def is_main(self) -> bool:
        return self.workers.is_main
