"""Evolutionary search of LongRoPE factors: the search space, its operators and the evolution loop.

Pure Python, no torch: the evolution sees the model only through the `Fitness` protocol, so its
budgets, racing, operators and n_hat search can be tested with a synthetic fitness in milliseconds.

Search space: lambda_i on a GRID = 0.01 grid within [low, high], non-decreasing in i; n_hat from the
paper's choices {0, 1, 2, 4, ..., 32, 64, 128, 256} below the original window (n_hat_choices: a
256-token window never gets n_hat 256).

Where this follows LongRoPE and where it departs. [paper]: arXiv 2402.13753, section 3.2 (search space and
Algorithm 1). [released]: microsoft/LongRoPE evolution/algorithms/genetic_base.py and dim_mono.py
(lambda only: the released search has no n_hat). [research]: the same repository at commit 2270c77b,
evolution/GeneticAlgorithm.py with method dim_mono_n (lambda and n_hat).
  initial     the PI, NTK, YaRN and llama3 sets on the grid, then mutants of them up to the population
              size, all at the source's n_hat ([paper]: PI, NTK, YaRN and mutants; [released]: YaRN and
              its mutants; llama3 is ours).
  selection   each iteration the `parents` fittest of the population, then their children: (mu + lambda),
              as [released].
  mutation    each dimension with probability p is redrawn uniformly between its neighbours' values
              (children stay monotone), as [research] (mutate_valid_alpha, p = 0.3); [released] redraws
              every dimension in turn whenever it mutates (its 0.3 only skips passes). Both redraw until
              the child is new; we try 100 times. n_hat moves to a neighbouring choice with probability p
              (ours: [research] mutates its n_hat slot like a factor).
  crossover   two parents drawn from the fitness-sorted parents; the child is the FITTER one with one
              gene (a lambda_i, or n_hat) taken from the other, drawn uniformly among the single swaps
              that give a new monotone candidate; when there is none, a mutant of the fitter parent, as
              [released] falls back to. [released] walks the dimensions in order, taking each from the
              second parent with probability 0.3 x 0.5, and returns the first new monotone state: for
              parents that differ in a few genes, a single swap in most cases, but favouring low
              dimensions, and now and then two or more swaps made on the way to a monotone state.
  n_hat       [research] (try_start_token): every n_hat choice on 5 candidates drawn from the 10 fittest
              of the initial population, and (try_start_token_mutate) 5 random choices on every mutated
              child; a candidate's best variant joins the population when it beats the candidate. The
              paper preset does that (n_hat_sweep 5 of 10, n_hat_tries 5), except that the variant
              replaces its candidate (the same lambda with a worse n_hat) instead of joining beside it.
              The default preset sweeps every choice on the fittest initial candidate and tries 5 on
              each mutated child that wins its race (the others are not kept, whatever their n_hat),
              racing the variants too: all are scored on document 0, and only a candidate's best there,
              if it beats the candidate there, on all documents. [research]'s choices are {1, 2, 4, ...,
              32, 48, 64} for a 4k window; ours are the [paper]'s, below the window.
  fitness     perplexity on all documents for every candidate, as [released]; the default preset races
              (below), which [released] does not.
Presets:
  paper    population 64, 32 parents, 16 mutations + 16 crossovers per iteration, 40 iterations,
           p = 0.3 ([released] dim_mono_llama.json and dim_mono.py), n_hat as [research]
  default  population 16, 3 parents, 12 mutations + 4 crossovers, p = 0.15, up to 60 iterations,
           stop after 10 without improvement; each child is first scored on one document and
           finishes only if it would rank among the parents there ("racing"); n_hat as above
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .errors import LongRoPEError
from .source_rope import critical_ramp

GRID = 0.01
# n_hat, the number of first positions left un-interpolated, takes only these values (the paper's search space).
N_HAT_CHOICES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)


def n_hat_choices(window: int) -> tuple[int, ...]:
    """The n_hat choices for a model whose original window is `window` tokens: those below it (a converted
    checkpoint refuses n_hat >= its original window: the long set would then never be used)."""
    return tuple(choice for choice in N_HAT_CHOICES if choice < window)

NLL = tuple[float, int]  # one document's (sum of token NLLs in nats, number of tokens scored)


@dataclass(frozen=True)
class Preset:
    population: int
    parents: int
    mutations: int
    crossovers: int
    iterations: int
    mutation_p: float
    racing: bool  # score each child document by document; stop it once it could no longer rank among the parents
    patience: int | None  # stop after this many iterations without improvement
    n_hat_sweep: int  # every n_hat choice is tried on this many initial candidates, drawn from ...
    n_hat_sweep_from: int  # ... this many of the fittest
    n_hat_tries: int  # n_hat choices tried on each mutated child that is scored on all documents
    block_p: float = 0.0  # odds that a mutation also shifts a block of neighbouring dimensions (SearchSpace.shift_block)
    selection_documents: int | None = None  # candidates are ranked on the first this many documents (None: all) ...
    finalists: int = 0  # ... and the fittest this many confirmed on every document at the end (rank_finalists)
    max_evals: float | None = None  # the preset's budget in evaluations (--max-evals replaces it)
    n_hat: bool = True  # whether n_hat is searched unless the caller says (--n-hat / --no-n-hat)


PRESETS = {
    # microsoft/LongRoPE evolution/default_hyper_params/dim_mono_llama.json and algorithms/dim_mono.py; n_hat as
    # its research code (commit 2270c77b, GeneticAlgorithm.py: try_start_token, try_start_token_mutate)
    "paper": Preset(population=64, parents=32, mutations=16, crossovers=16, iterations=40, mutation_p=0.3,
                    racing=False, patience=None, n_hat_sweep=5, n_hat_sweep_from=10, n_hat_tries=5),
    # Tuned on the two testbeds (benchmarks/search_quality.py): few parents and mostly mutations exploit fast;
    # racing spends about one document on a child that would not be a parent; two documents rank candidates and
    # the finalists are confirmed on the others. n_hat is not searched: with it, held-out perplexity was higher on
    # both testbeds in all 3 seeds (BENCHMARKS.md, "Search: fidelity and cost").
    "default": Preset(population=16, parents=3, mutations=12, crossovers=4, iterations=60, mutation_p=0.15,
                      racing=True, patience=10, n_hat_sweep=1, n_hat_sweep_from=1, n_hat_tries=1, block_p=0.5,
                      selection_documents=2, finalists=4, max_evals=140, n_hat=False),
}


# The search spaces (SearchSpace.critical 0, or LongRoPE2's critical dimension) and the one that measured better on
# both testbeds (BENCHMARKS.md, "Search: fidelity and cost").
SPACES = ("full", "critical")
DEFAULT_SPACE = "full"
# What a search's Fitness measures (search.ModelFitness): "ppl", the perplexity of whole documents (LongRoPE);
# "needle", the perplexity of the answer tokens of needle items built on the documents (LongRoPE2's needle-driven
# perplexity, search.needle_documents); "ppl+needle", perplexity, with its fittest few ranked on needle items at the
# end.
OBJECTIVES = ("ppl", "needle", "ppl+needle")
DEFAULT_OBJECTIVE = "ppl"
OBJECTIVE_LABELS = {"ppl": "perplexity", "needle": "answer-token perplexity", "ppl+needle": "perplexity"}


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
    """Candidates: lambda on the GRID, non-decreasing, the searched dimensions within [low, high] (grid steps);
    n_hat among `n_hat_choices`.

    `critical` 0: every dimension is searched (LongRoPE's space). Otherwise LongRoPE2's space: the dimensions
    from `critical` on are searched (low is then the extension: lambda >= s there), and those below it follow
    the geometric ramp lambda_i = lambda_critical^(i / critical) (source_rope.critical_ramp, rounded to the grid).
    """

    dims: int
    low: int  # grid steps
    high: int
    n_hat_choices: tuple[int, ...]
    critical: int = 0

    @classmethod
    def from_bounds(cls, dims: int, low: float, high: float, n_hat_choices: Sequence[int] = N_HAT_CHOICES,
                    critical: int = 0) -> SearchSpace:
        """The space of `dims` factors, those searched within [low, high] (low rounded up to the grid); raises
        LongRoPEError unless 1 <= low <= high and 0 <= critical < dims."""
        if not 1.0 <= low <= high:
            raise LongRoPEError(f"factor bounds must satisfy 1 <= low <= high, got [{low}, {high}]")
        if not 0 <= critical < dims:
            raise LongRoPEError(f"the critical dimension must lie in [0, {dims - 1}], got {critical}")
        low_steps = math.ceil(low / GRID - 1e-6)
        return cls(dims, low_steps, max(round(high / GRID), low_steps), tuple(n_hat_choices), critical)

    def with_ramp(self, steps: Sequence[int]) -> tuple[int, ...]:
        """The steps with those below the critical dimension set to the ramp to its value."""
        if not self.critical:
            return tuple(steps)
        ramp = critical_ramp(steps[self.critical] * GRID, self.critical, self.critical)
        return tuple(round(factor / GRID) for factor in ramp) + tuple(steps[self.critical :])

    def snap(self, factors: Sequence[float], n_hat: int = 0) -> Candidate:
        """The nearest candidate: on the grid, within bounds, non-decreasing, the ramp below the critical
        dimension, n_hat among the choices."""
        steps, floor = [0] * self.critical, self.low
        for factor in factors[self.critical :]:
            floor = min(max(round(factor / GRID), floor), self.high)
            steps.append(floor)
        return Candidate(self.with_ramp(steps), min(self.n_hat_choices, key=lambda choice: abs(choice - n_hat)))

    def contains(self, candidate: Candidate) -> bool:
        steps, searched = candidate.steps, candidate.steps[self.critical :]
        return (len(steps) == self.dims and all(self.low <= s <= self.high for s in searched)
                and all(a <= b for a, b in zip(searched, searched[1:])) and steps == self.with_ramp(steps)
                and candidate.n_hat in self.n_hat_choices)

    def mutate(self, parent: Candidate, rng: random.Random, p: float, block_p: float = 0.0) -> Candidate:
        """Each searched dimension redrawn with probability p between its neighbours' values (the child stays
        monotone), then with probability `block_p` a block shifted (shift_block); n_hat moved to a neighbouring
        choice with probability p."""
        steps, first = list(parent.steps), self.critical
        for i in range(first, self.dims):
            if rng.random() < p:
                lower = steps[i - 1] if i > first else self.low
                upper = steps[i + 1] if i < self.dims - 1 else self.high
                steps[i] = rng.randint(lower, upper)
        if rng.random() < block_p:
            steps = self.shift_block(steps, rng)
        n_hat = parent.n_hat
        if len(self.n_hat_choices) > 1 and rng.random() < p:
            index = self.n_hat_choices.index(n_hat) + rng.choice((-1, 1))
            n_hat = self.n_hat_choices[min(max(index, 0), len(self.n_hat_choices) - 1)]
        return Candidate(self.with_ramp(steps), n_hat)

    def shift_block(self, steps: Sequence[int], rng: random.Random) -> list[int]:
        """A block of neighbouring searched dimensions (between two random ones) moved together by a shift of
        random sign and a log-uniform size from one grid step to the whole range, within bounds; a neighbour it
        runs into is pushed along, so the child stays monotone. A single redraw cannot move a dimension past its
        neighbours: with 64 factors, many of them equal, a block move is what shifts a region of the spectrum."""
        steps, first = list(steps), self.critical
        start, end = sorted((rng.randint(first, self.dims - 1), rng.randint(first, self.dims - 1)))
        size = round(math.exp(rng.uniform(0.0, math.log(max(self.high - self.low, 1)))))
        shift = size if rng.random() < 0.5 else -size
        for i in range(start, end + 1):
            steps[i] = min(max(steps[i] + shift, self.low), self.high)
        for i in range(end + 1, self.dims):
            steps[i] = max(steps[i], steps[end])
        for i in range(start - 1, first - 1, -1):
            steps[i] = min(steps[i], steps[start])
        return steps

    def crossover(self, fitter: Candidate, other: Candidate, rng: random.Random,
                  is_new: Callable[[Candidate], bool]) -> Candidate | None:
        """The fitter parent with one gene (a searched lambda_i, or n_hat) taken from the other parent, drawn
        uniformly among the single swaps that give a new candidate of the space; None when no swap does."""
        swaps = [Candidate(self.with_ramp(fitter.steps[:i] + (step,) + fitter.steps[i + 1 :]), fitter.n_hat)
                 for i, step in enumerate(other.steps) if i >= self.critical and step != fitter.steps[i]]
        if other.n_hat != fitter.n_hat:
            swaps.append(Candidate(fitter.steps, other.n_hat))
        valid = [child for child in swaps if self.contains(child) and is_new(child)]
        return rng.choice(valid) if valid else None

    def with_n_hats(self, candidate: Candidate, rng: random.Random, tries: int | None) -> list[Candidate]:
        """The candidate with other n_hat choices: all of them (tries None), or `tries` drawn at random."""
        others = [choice for choice in self.n_hat_choices if choice != candidate.n_hat]
        picked = others if tries is None else rng.sample(others, min(tries, len(others)))
        return [Candidate(candidate.steps, choice) for choice in picked]


class Fitness(Protocol):
    """What the evolution minimises: the NLL of candidates on a fixed set of documents."""

    documents: int  # how many documents one full evaluation of a candidate covers

    def nll(self, requests: Sequence[tuple[Candidate, int]], on_result: Callable[[Candidate, int, NLL], None],
            keep_going: Callable[[], bool]) -> None:
        """Evaluate the (candidate, document index) requests in order, calling on_result as each one
        finishes; before each evaluation it computes, stop if keep_going() is False."""


def perplexity_of(results: Iterable[NLL]) -> float:
    """exp(total NLL / total tokens) over documents' (NLL sum, tokens)."""
    results = list(results)
    return math.exp(math.fsum(nll for nll, _ in results) / sum(tokens for _, tokens in results))


def rank_finalists(finalists: Sequence[Candidate], fitness: Fitness, documents: Sequence[int],
                   results: dict[tuple[Candidate, int], NLL], keep_going: Callable[[], bool] = lambda: True,
                   on_evaluation: Callable[[], None] = lambda: None) -> list[tuple[float, Candidate]]:
    """The final stage of a search: the finalists scored on `documents` and ranked by perplexity there, best first
    (ties by candidate). `results` holds the (candidate, document) NLLs known already, which are not asked for
    again, and receives the new ones (`on_evaluation` once each). A finalist not finished when keep_going()
    stops the fitness is left out.

    The evolution confirms its fittest on every document with it when it ranked candidates on fewer (held-out
    confirmation); any other objective given as a Fitness (a needle task) can rank the same finalists."""
    def record(candidate: Candidate, document: int, nll: NLL) -> None:
        results[(candidate, document)] = nll
        on_evaluation()

    fitness.nll([(c, doc) for c in finalists for doc in documents if (c, doc) not in results], record, keep_going)
    scored = [c for c in finalists if all((c, doc) in results for doc in documents)]
    return sorted((perplexity_of(results[(c, doc)] for doc in documents), c) for c in scored)


@dataclass
class SearchResult:
    best: Candidate | None  # None when the time ran out before any candidate was scored on all documents
    best_perplexity: float  # on all documents; inf when best is None
    history: list[tuple[float, float]]  # (evaluations so far, best perplexity so far on the ranking documents)
    evaluations: float  # in units of one candidate on all documents
    iterations: int  # evolution steps completed after the initial population
    stopped_by: str  # "iterations", "patience", "max_evals" or "time_budget"
    finalists: list[tuple[float, Candidate]] = field(default_factory=list)  # rank_finalists' ranking, if confirmed


class Evolution:
    """(mu + lambda) evolution over a search space, deterministic for a given seed.

    Candidates are ranked on the first `preset.selection_documents` documents (all by default): `scores` holds
    their perplexity there (inf for children raced out), `results` every (candidate, document) NLL, `seen` the
    candidates ever proposed (none is proposed twice), `history` the best so far. With fewer ranking documents
    than the fitness has, the `preset.finalists` fittest are confirmed on all of them at the end (rank_finalists)
    and the best there wins. Budgets: `max_evals` in evaluations (one candidate on all documents; the preset's
    when None), never exceeded (no candidate is started that might not finish within it, and the confirmation is
    kept room for); `keep_going`, asked by the fitness before every document evaluation (a time budget: the search
    stops within one document evaluation of it, keeping the candidates scored so far), and `keep_confirming` in
    the confirmation (keep_going by default: a time budget can leave room for it by stopping the evolution
    earlier). `on_evaluation` is called once per (candidate, document) result as it arrives, `on_best` with each
    new best perplexity on the ranking documents.
    """

    def __init__(self, space: SearchSpace, initial: list[Candidate], preset: Preset, fitness: Fitness, *,
                 seed: int, max_evals: float | None = None, keep_going: Callable[[], bool] = lambda: True,
                 keep_confirming: Callable[[], bool] | None = None, on_evaluation: Callable[[], None] = lambda: None,
                 on_best: Callable[[float], None] = lambda perplexity: None) -> None:
        self.space, self.initial, self.preset, self.fitness = space, initial, preset, fitness
        self.max_evals = preset.max_evals if max_evals is None else max_evals
        self.keep_going, self.on_evaluation, self.on_best = keep_going, on_evaluation, on_best
        self.keep_confirming = keep_confirming or keep_going
        self.rng = random.Random(seed)
        self.ranking = list(range(min(preset.selection_documents or fitness.documents, fitness.documents)))
        confirmed = len(self.ranking) < fitness.documents and preset.finalists > 0
        self.finalists = preset.finalists if confirmed else 0
        # evaluations kept for the confirmation: the finalists on the documents they were not ranked on
        self.reserve = self.finalists * (fitness.documents - len(self.ranking)) / fitness.documents
        self.scores: dict[Candidate, float] = {}
        self.results: dict[tuple[Candidate, int], NLL] = {}
        self.seen: set[Candidate] = set()
        self.history: list[tuple[float, float]] = []
        self.best_perplexity = math.inf

    @property
    def evaluations(self) -> float:
        """Evaluations so far (replayed ones included, so a resumed search stops alike), in candidates."""
        return len(self.results) / self.fitness.documents

    def run(self) -> SearchResult:
        """Score the initial population and sweep n_hat on its fittest, evolve until the iterations, patience or a
        budget end it, then confirm the finalists."""
        preset = self.preset
        population = self._initial_population()
        in_time = self._score(self._affordable(population), race_against=None)
        population = [c for c in population if c in self.scores]
        if in_time:
            ranked = self._ranked(population)
            fittest = ranked[: preset.n_hat_sweep_from]
            swept = self.rng.sample(fittest, min(preset.n_hat_sweep, len(fittest)))
            in_time, better = self._try_n_hats(swept, None)
            population = [better.get(c, c) for c in population]
        stale, iterations, stopped_by = 0, 0, "iterations" if in_time else "time_budget"
        for _ in range(preset.iterations if in_time else 0):
            if self._room() < 1:
                stopped_by = "max_evals"
                break
            parents = self._ranked(population)[: preset.parents]
            mutants, crossed = self._children(parents)
            before = self.best_perplexity
            race_against = parents if preset.racing else None
            in_time = self._score(self._affordable(mutants + crossed), race_against)
            finished = [c for c in mutants + crossed if math.isfinite(self.scores.get(c, math.inf))]
            if in_time:
                in_time, better = self._try_n_hats([c for c in mutants if c in finished], preset.n_hat_tries)
                finished = [better.get(c, c) for c in finished]
            if not in_time:
                stopped_by = "time_budget"
                break
            population = parents + finished
            iterations += 1
            stale = 0 if self.best_perplexity < before * (1 - 1e-4) else stale + 1
            if preset.patience is not None and stale >= preset.patience:
                stopped_by = "patience"
                break
        finite = self._ranked([c for c in self.scores if math.isfinite(self.scores[c])])
        finalists = []
        if self.finalists:
            finalists = rank_finalists(finite[: self.finalists], self.fitness, range(self.fitness.documents),
                                       self.results, self.keep_confirming, self.on_evaluation)
            if len(finalists) < min(self.finalists, len(finite)):
                stopped_by = "time_budget"
            best_perplexity, winner = finalists[0] if finalists else (math.inf, None)
        else:
            winner = finite[0] if finite else None
            best_perplexity = self.scores[winner] if winner else math.inf
        return SearchResult(best=winner, best_perplexity=best_perplexity, history=self.history,
                            evaluations=self.evaluations, iterations=iterations, stopped_by=stopped_by,
                            finalists=finalists)

    def _ranked(self, candidates: list[Candidate]) -> list[Candidate]:
        """Fittest first (ties broken by the candidate, so that the order is deterministic)."""
        return sorted(candidates, key=lambda c: (self.scores[c], c))

    def _mean_nll(self, candidate: Candidate, documents: int) -> float:
        """Mean NLL per token of a candidate on the first `documents` ranking documents."""
        results = [self.results[(candidate, doc)] for doc in self.ranking[:documents]]
        return math.fsum(nll for nll, _ in results) / sum(tokens for _, tokens in results)

    def _try_n_hats(self, candidates: list[Candidate], tries: int | None) -> tuple[bool, dict[Candidate, Candidate]]:
        """Each candidate with other n_hat choices (all, or `tries` at random: SearchSpace.with_n_hats); returns
        {candidate: its best variant} for the variants that beat their candidate, and False first when keep_going
        stopped the fitness. With racing, every variant is scored on the first document and only each candidate's
        best there goes on, document by document while it beats the candidate (only one variant can be kept)."""
        variants = {}
        for candidate in candidates:
            variants[candidate] = [v for v in self.space.with_n_hats(candidate, self.rng, tries) if v not in self.seen]
            self.seen.update(variants[candidate])
        affordable = self._affordable([v for new in variants.values() for v in new])
        variants = {candidate: [v for v in new if v in affordable] for candidate, new in variants.items()}
        if self.preset.racing and len(self.ranking) > 1:
            if not self._request(affordable, 1):
                return False, {}
            racers = {}
            for candidate, new in variants.items():
                best = min(new, key=lambda v: (self._mean_nll(v, 1), v), default=None)
                if best is not None:
                    racers[best] = candidate
            self.scores.update((v, math.inf) for v in affordable if v not in racers)
            in_time = self._race(list(racers), lambda variant, documents: self._mean_nll(racers[variant], documents))
        else:
            in_time = self._race(affordable, None)
        better = {}
        for candidate, new in variants.items():
            scored = [v for v in new if math.isfinite(self.scores.get(v, math.inf))]
            best = min(scored, key=lambda v: (self.scores[v], v), default=None)
            if best is not None and self.scores[best] < self.scores[candidate]:
                better[candidate] = best
        return in_time, better

    def _room(self) -> float:
        """How many more candidates the evaluation budget allows, each scored on every ranking document, after the
        confirmation's reserve (inf without a budget)."""
        if self.max_evals is None or self.max_evals == math.inf:
            return math.inf
        each = len(self.ranking) / self.fitness.documents
        return max(math.floor((self.max_evals - self.reserve - self.evaluations) / each + 1e-9), 0)

    def _affordable(self, candidates: list[Candidate]) -> list[Candidate]:
        """As many candidates as the evaluation budget allows."""
        room = self._room()
        return candidates if room == math.inf else candidates[:room]

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
                                                              self.preset.mutation_p, self.preset.block_p))
            if child is None:
                break
            population.append(child)
        return population

    def _children(self, parents: list[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
        """Mutants and crossovers of the parents (fittest first); each new."""
        rng, space, preset = self.rng, self.space, self.preset
        mutants, crossed = [], []
        for _ in range(preset.mutations):
            child = self._new_child(lambda: space.mutate(rng.choice(parents), rng, preset.mutation_p, preset.block_p))
            mutants += [child] if child else []
        for _ in range(preset.crossovers):
            # indices into the fitness-sorted parents, as the official code draws them: the first is the fitter
            first, second = sorted(rng.sample(range(len(parents)), 2)) if len(parents) > 1 else (0, 0)
            fitter, other = parents[first], parents[second]
            child = space.crossover(fitter, other, rng, lambda c: c not in self.seen)
            if child is not None:
                self.seen.add(child)
            else:
                child = self._new_child(lambda: space.mutate(fitter, rng, preset.mutation_p, preset.block_p))
            crossed += [child] if child else []
        return mutants, crossed

    def _record(self, candidate: Candidate, doc: int, nll: NLL) -> None:
        if (candidate, doc) not in self.results:
            self.results[(candidate, doc)] = nll
            self.on_evaluation()

    def _score(self, candidates: list[Candidate], race_against: list[Candidate] | None) -> bool:
        """Perplexity on the ranking documents of the candidates not yet scored; with `race_against`, raced
        document by document against the worst of them (the others score inf). False when keep_going stopped the
        fitness first: the candidates it finished are scored."""
        candidates = [c for c in candidates if c not in self.scores]
        if race_against is None:
            return self._race(candidates, None)
        rank = min(self.preset.parents, len(race_against)) - 1
        return self._race(candidates, lambda c, documents: sorted(self._mean_nll(p, documents)
                                                                  for p in race_against)[rank])

    def _race(self, candidates: list[Candidate], bar: Callable[[Candidate, int], float] | None) -> bool:
        """Score the candidates on the ranking documents, one document at a time for all of them; with `bar`, a
        candidate whose mean NLL on the first k documents exceeds bar(candidate, k) stops there and scores inf.
        The finished ones get their perplexity (`scores`); False when keep_going stopped the fitness first."""
        alive = list(candidates)
        for documents in range(1, len(self.ranking)) if bar is not None else ():
            if not self._request(alive, documents):
                return False
            losers = [c for c in alive if self._mean_nll(c, documents) > bar(c, documents)]
            self.scores.update((c, math.inf) for c in losers)
            alive = [c for c in alive if c not in losers]
        # the rest candidate by candidate, so that a time budget leaves whole candidates scored
        self.fitness.nll([(c, doc) for c in alive for doc in self.ranking if (c, doc) not in self.results],
                         self._record, self.keep_going)
        if any((c, doc) not in self.results for c in alive for doc in self.ranking):
            for candidate in alive:
                if all((candidate, doc) in self.results for doc in self.ranking):
                    self._scored(candidate)
            return False
        for candidate in alive:
            self._scored(candidate)
        return True

    def _scored(self, candidate: Candidate) -> None:
        """Record the perplexity of a candidate scored on every ranking document."""
        self.scores[candidate] = math.exp(self._mean_nll(candidate, len(self.ranking)))
        if self.scores[candidate] < self.best_perplexity:
            self.best_perplexity = self.scores[candidate]
            self.on_best(self.best_perplexity)
        self.history.append((self.evaluations, self.best_perplexity))

    def _request(self, candidates: list[Candidate], documents: int) -> bool:
        """The candidates' results on the first `documents` ranking documents (those missing asked for in one
        batch, document by document); False when keep_going stopped the fitness first."""
        docs = self.ranking[:documents]
        self.fitness.nll([(c, doc) for doc in docs for c in candidates if (c, doc) not in self.results],
                         self._record, self.keep_going)
        return all((c, doc) in self.results for c in candidates for doc in docs)
