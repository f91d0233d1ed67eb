"""Evolutionary search of LongRoPE factors: the search space, its operators and the evolution loop.

Pure Python, no torch: the evolution sees the model only through the `Fitness` protocol, so its
budgets, racing and patience can be tested with a synthetic fitness in milliseconds.

Search space: lambda_i on a GRID = 0.01 grid within [low, high], non-decreasing in i; n_hat from
N_HAT_CHOICES. Operators, as in LongRoPE's official search (microsoft/LongRoPE, evolution/algorithms):
  mutation   each dimension with probability p is redrawn uniformly between its neighbours'
             values (children stay monotone); n_hat moves to a neighbouring choice with probability p
  crossover  each dimension comes from the second parent with probability p_c, n_hat from either;
             children already seen or outside the space are redrawn (100 tries, then a mutation)
Presets:
  paper    population 64, 32 parents, 16 mutations + 16 crossovers per iteration, 40 iterations,
           p = 0.3, p_c = 0.3 x 0.5 (microsoft/LongRoPE's dim_mono hyper-parameters)
  default  population 16, 3 parents, 12 mutations + 4 crossovers, p = 0.15, up to 60 iterations,
           stop after 10 without improvement; each child is first scored on one document and
           finishes only if it would rank among the parents there ("racing")
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import LongRoPEError

GRID = 0.01
# n_hat, the number of first positions left un-interpolated, takes only these values (the official search's).
N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)

NLL = tuple[float, int]  # one document's (sum of token NLLs in nats, number of tokens scored)


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
        """How the search log names this candidate, e.g. "n4:100,100,112"."""
        return f"n{self.n_hat}:" + ",".join(map(str, self.steps))


@dataclass(frozen=True)
class SearchSpace:
    dims: int
    low: int  # grid steps
    high: int
    n_hat_choices: tuple[int, ...]

    @classmethod
    def from_bounds(cls, dims: int, low: float, high: float,
                    n_hat_choices: Sequence[int] = N_HAT_CHOICES) -> SearchSpace:
        """The space of `dims` factors within [low, high]; raises LongRoPEError unless 1 <= low <= high."""
        if not 1.0 <= low <= high:
            raise LongRoPEError(f"factor bounds must satisfy 1 <= low <= high, got [{low}, {high}]")
        return cls(dims, round(low / GRID), round(high / GRID), tuple(n_hat_choices))

    def snap(self, factors: Sequence[float], n_hat: int = 0) -> Candidate:
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


class Fitness(Protocol):
    """What the evolution minimises: the NLL of candidates on a fixed set of documents."""

    documents: int  # how many documents one full evaluation of a candidate covers

    def nll(self, requests: Sequence[tuple[Candidate, int]],
            on_result: Callable[[Candidate, int, NLL], None]) -> None:
        """Evaluate each (candidate, document index) request, calling on_result as each one finishes."""


def perplexity_of(results: Iterable[NLL]) -> float:
    """exp(total NLL / total tokens) over documents' (NLL sum, tokens)."""
    results = list(results)
    return math.exp(math.fsum(nll for nll, _ in results) / sum(tokens for _, tokens in results))


@dataclass
class SearchResult:
    best: Candidate
    best_perplexity: float
    history: list[tuple[float, float]]  # (evaluations so far, best perplexity so far), one per scored candidate
    evaluations: float  # in units of one candidate on all documents
    iterations: int  # evolution steps completed after the initial population
    stopped_by: str  # "iterations", "patience", "max_evals" or "time_budget"


class Evolution:
    """(mu + lambda) evolution over a search space, deterministic for a given seed.

    Holds the state of one search: full-fitness perplexities (`scores`, inf for children raced
    out), mean NLL on document 0 (`probe`, what racing compares), every (candidate, document)
    result (`results`), the candidates ever proposed (`seen`: none is proposed twice) and the
    best-so-far `history`. Budgets: `max_evals` in evaluations (one candidate on all documents),
    `time_budget` in seconds of `clock`, both checked before every evolution step. `on_evaluation`
    is called once per (candidate, document) result as it arrives, `on_best` with each new best
    perplexity.
    """

    def __init__(self, space: SearchSpace, initial: list[Candidate], preset: Preset, fitness: Fitness, *,
                 seed: int, max_evals: float | None = None, time_budget: float | None = None,
                 clock: Callable[[], float] = time.perf_counter, on_evaluation: Callable[[], None] = lambda: None,
                 on_best: Callable[[float], None] = lambda perplexity: None) -> None:
        self.space, self.initial, self.preset, self.fitness = space, initial, preset, fitness
        self.max_evals, self.time_budget, self.clock = max_evals, time_budget, clock
        self.on_evaluation, self.on_best = on_evaluation, on_best
        self.rng = random.Random(seed)
        self.started = clock()
        self.scores: dict[Candidate, float] = {}
        self.probe: dict[Candidate, float] = {}
        self.results: dict[tuple[Candidate, int], NLL] = {}
        self.seen: set[Candidate] = set()
        self.history: list[tuple[float, float]] = []
        self.best_perplexity = math.inf

    @property
    def evaluations(self) -> float:
        """Evaluations so far (replayed ones included, so a resumed search stops alike), in candidates."""
        return len(self.results) / self.fitness.documents

    def run(self) -> SearchResult:
        preset = self.preset
        population = self._initial_population()
        self._score(self._affordable(population), race_against=None)
        population = [c for c in population if c in self.scores]
        stale, iterations, stopped_by = 0, 0, "iterations"
        for _ in range(preset.iterations):
            stopped_by = self._spent(cost=1.0)
            if stopped_by:
                break
            stopped_by = "iterations"
            parents = sorted(population, key=lambda c: (self.scores[c], c))[: preset.parents]
            children = self._children(parents)
            before = self.best_perplexity
            self._score(self._affordable(children), race_against=parents if preset.racing else None)
            population = parents + [c for c in children if math.isfinite(self.scores.get(c, math.inf))]
            iterations += 1
            stale = 0 if self.best_perplexity < before * (1 - 1e-4) else stale + 1
            if preset.patience is not None and stale >= preset.patience:
                stopped_by = "patience"
                break
        winner = min((c for c in self.scores if math.isfinite(self.scores[c])), key=lambda c: (self.scores[c], c))
        return SearchResult(best=winner, best_perplexity=self.scores[winner], history=self.history,
                            evaluations=self.evaluations, iterations=iterations, stopped_by=stopped_by)

    def _spent(self, cost: float = 0.0) -> str:
        """The budget that would be exceeded by `cost` more evaluations ("" if none)."""
        if self.max_evals is not None and self.evaluations + cost > self.max_evals + 1e-9:
            return "max_evals"
        if self.time_budget is not None and self.clock() - self.started > self.time_budget:
            return "time_budget"
        return ""

    def _affordable(self, candidates: list[Candidate]) -> list[Candidate]:
        """As many candidates as the evaluation budget allows (each may cost a full evaluation)."""
        if self.max_evals is None:
            return candidates
        room = math.floor(self.max_evals - self.evaluations + 1e-9)
        return candidates[: max(room, 0)]

    def _new_child(self, make: Callable[[], Candidate]) -> Candidate | None:
        for _ in range(100):
            child = make()
            if child not in self.seen and self.space.contains(child):
                self.seen.add(child)
                return child
        return None

    def _initial_population(self) -> list[Candidate]:
        """The starting candidates (deduplicated), then mutants of them up to the population size."""
        population = []
        for candidate in self.initial:
            if candidate not in self.seen:
                self.seen.add(candidate)
                population.append(candidate)
        while len(population) < self.preset.population:
            child = self._new_child(lambda: self.space.mutate(self.rng.choice(self.initial), self.rng,
                                                              self.preset.mutation_p))
            if child is None:
                break
            population.append(child)
        return population

    def _children(self, parents: list[Candidate]) -> list[Candidate]:
        rng, space, preset = self.rng, self.space, self.preset
        children = []
        for _ in range(preset.mutations):
            child = self._new_child(lambda: space.mutate(rng.choice(parents), rng, preset.mutation_p))
            children += [child] if child else []
        for _ in range(preset.crossovers):
            first, second = sorted(rng.sample(parents, 2)) if len(parents) > 1 else (parents[0], parents[0])
            child = self._new_child(lambda: space.crossover(first, second, rng, preset.crossover_p))
            child = child or self._new_child(lambda: space.mutate(first, rng, preset.mutation_p))
            children += [child] if child else []
        return children

    def _record(self, candidate: Candidate, doc: int, nll: NLL) -> None:
        if (candidate, doc) not in self.results:
            self.results[(candidate, doc)] = nll
            self.on_evaluation()

    def _score(self, candidates: list[Candidate], race_against: list[Candidate] | None) -> None:
        """Full-fitness perplexity of the candidates not yet scored; with `race_against`, only of
        those whose NLL on document 0 would rank them among the parents (the others score inf)."""
        candidates = [c for c in candidates if c not in self.scores]
        docs = self.fitness.documents
        if race_against is not None and docs > 1:
            self.fitness.nll([(c, 0) for c in candidates], self._record)
            for candidate in candidates:
                nll, tokens = self.results[(candidate, 0)]
                self.probe[candidate] = nll / tokens
            bar = sorted(self.probe[p] for p in race_against)[min(self.preset.parents, len(race_against)) - 1]
            finalists = [c for c in candidates if self.probe[c] <= bar]
            self.scores.update((c, math.inf) for c in candidates if self.probe[c] > bar)
        else:
            finalists = candidates
        self.fitness.nll([(c, doc) for c in finalists for doc in range(docs) if (c, doc) not in self.results],
                         self._record)
        for candidate in finalists:
            self.scores[candidate] = perplexity_of(self.results[(candidate, doc)] for doc in range(docs))
            nll, tokens = self.results[(candidate, 0)]
            self.probe[candidate] = nll / tokens
            if self.scores[candidate] < self.best_perplexity:
                self.best_perplexity = self.scores[candidate]
                self.on_best(self.best_perplexity)
            self.history.append((self.evaluations, self.best_perplexity))
