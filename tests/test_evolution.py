"""The evolution against a synthetic fitness: determinism, racing, budgets, patience, progress (milliseconds each)."""

import math
import random

from longrope_convert.evolution import PRESETS, Candidate, Evolution, Preset, SearchSpace

TOKENS = 100


class QuadraticFitness:
    """NLL grows with the squared distance of a candidate's steps from a hidden optimum; document d adds d/10."""

    def __init__(self, space: SearchSpace, documents: int = 3, seed: int = 0, flat: bool = False) -> None:
        rng = random.Random(seed)
        self.optimum = sorted(rng.randint(space.low, space.high) for _ in range(space.dims))
        self.documents, self.flat = documents, flat
        self.requests: list[tuple[Candidate, int]] = []  # every evaluation asked for, in order

    def mean_nll(self, candidate: Candidate, doc: int) -> float:
        if self.flat:
            return 4.0
        distance = sum((s - o) ** 2 for s, o in zip(candidate.steps, self.optimum)) / len(self.optimum)
        return 3.0 + distance / 1e4 + doc / 10 + abs(candidate.n_hat - 8) / 1e3

    def nll(self, requests, on_result) -> None:
        for candidate, doc in requests:
            self.requests.append((candidate, doc))
            on_result(candidate, doc, (self.mean_nll(candidate, doc) * TOKENS, TOKENS))


def setup(preset="default", documents=3, seed=0, flat=False, **budget):
    space = SearchSpace.from_bounds(8, 1.0, 8.0)
    initial = [space.snap([1.0] * 8), space.snap([8.0] * 8), space.snap([1 + i for i in range(8)])]
    fitness = QuadraticFitness(space, documents, seed, flat)
    evolution = Evolution(space, initial, PRESETS[preset] if isinstance(preset, str) else preset, fitness,
                          seed=seed, **budget)
    return evolution, fitness


def test_the_same_seed_gives_the_same_search_and_it_improves_on_the_initial_population():
    first, fitness = setup(seed=3, max_evals=200)
    result = first.run()
    again = setup(seed=3, max_evals=200)[0].run()
    assert (result.best, result.history) == (again.best, again.history)
    initial_best = min(math.exp(sum(fitness.mean_nll(c, d) for d in range(3)) / 3) for c in first.initial)
    assert result.best_perplexity < 0.9 * initial_best
    assert result.best_perplexity == min(s for s in first.scores.values())


def test_no_candidate_and_document_is_evaluated_twice():
    evolution, fitness = setup(preset="paper", max_evals=150)
    evolution.run()
    assert len(fitness.requests) == len(set(fitness.requests))
    assert all(evolution.space.contains(candidate) for candidate, _ in fitness.requests)


def test_racing_finishes_only_children_that_would_rank_among_the_parents():
    evolution, fitness = setup(max_evals=120)
    evolution.run()
    raced_out = [c for c, score in evolution.scores.items() if score == math.inf]
    assert raced_out, "some children must lose the race on this fitness"
    for candidate in raced_out:  # scored on document 0 only
        assert [doc for c, doc in fitness.requests if c == candidate] == [0]
    finished = [c for c, score in evolution.scores.items() if math.isfinite(score)]
    assert all(sorted(doc for c, doc in fitness.requests if c == candidate) == [0, 1, 2] for candidate in finished)


def test_the_evaluation_budget_holds_even_below_the_initial_population():
    for max_evals in (1, 3, 16.5, 40):
        evolution, _ = setup(max_evals=max_evals)
        result = evolution.run()
        assert result.evaluations <= max_evals
        assert result.evaluations >= min(max_evals, 16) - 1  # spent, not abandoned
        assert result.stopped_by == "max_evals"


def test_patience_stops_a_search_that_no_longer_improves():
    evolution, _ = setup(flat=True)
    result = evolution.run()
    assert result.stopped_by == "patience" and result.iterations == PRESETS["default"].patience


def test_the_search_ends_after_its_iterations_without_a_budget():
    preset = Preset(population=6, parents=2, mutations=3, crossovers=1, iterations=4, mutation_p=0.3,
                    crossover_p=0.15, racing=False, patience=None)
    evolution, fitness = setup(preset=preset)
    result = evolution.run()
    assert result.stopped_by == "iterations" and result.iterations == 4
    assert result.evaluations == len(fitness.requests) / 3 == 6 + 4 * 4


def test_progress_is_reported_per_finished_evaluation_not_per_batch():
    calls = []
    evolution, fitness = setup(max_evals=30, on_evaluation=lambda: calls.append(len(fitness.requests)))
    evolution.run()
    # the i-th call came right after the i-th evaluation, not when its batch returned
    assert calls == list(range(1, len(fitness.requests) + 1))
