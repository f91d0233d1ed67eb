"""The evolution against a synthetic fitness: operators, n_hat, determinism, racing, budgets, patience, progress
(milliseconds each)."""

import math
import random
from dataclasses import replace

from longrope_convert.evolution import PRESETS, Candidate, Evolution, Preset, SearchSpace, n_hat_choices
from longrope_convert.factors import ModelFingerprint, factor_set_from_json
from longrope_convert.search import long_search_task

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

    def nll(self, requests, on_result, keep_going) -> None:
        for candidate, doc in requests:
            if not keep_going():
                return
            self.requests.append((candidate, doc))
            on_result(candidate, doc, (self.mean_nll(candidate, doc) * TOKENS, TOKENS))


def setup(preset="default", documents=3, seed=0, flat=False, **budget):
    space = SearchSpace.from_bounds(8, 1.0, 8.0)
    initial = [space.snap([1.0] * 8), space.snap([8.0] * 8), space.snap([1 + i for i in range(8)])]
    fitness = QuadraticFitness(space, documents, seed, flat)
    evolution = Evolution(space, initial, PRESETS[preset] if isinstance(preset, str) else preset, fitness,
                          seed=seed, **budget)
    return evolution, fitness


def test_operators_keep_candidates_valid_and_new():
    """Property test over many seeds and random parents: every child is in the space (grid, bounds,
    monotone, n_hat choice), and the search never proposes a candidate twice."""
    for seed in range(200):
        rng = random.Random(seed)
        dims = rng.choice([4, 8, 32, 64])
        space = SearchSpace.from_bounds(dims, 1.0, rng.choice([1.5, 2.5, 10.0]))
        parents = [space.snap(sorted(rng.uniform(1, 12) for _ in range(dims)), rng.choice(range(300)))
                   for _ in range(4)]
        assert all(space.contains(p) for p in parents)
        for _ in range(20):
            child = space.mutate(rng.choice(parents), rng, rng.choice([0.1, 0.3, 1.0]))
            assert space.contains(child)
            fitter, other = rng.sample(parents, 2)
            crossed = space.crossover(fitter, other, rng, is_new=lambda candidate: True)
            if fitter == other:  # nothing to take from the other
                assert crossed is None
                continue
            assert space.contains(crossed)  # two different monotone parents always allow a monotone single swap
            assert genes_apart(crossed, fitter) == 1 and genes_apart(crossed, other) == genes_apart(fitter, other) - 1


def genes_apart(first: Candidate, second: Candidate) -> int:
    """How many genes (lambda_i steps, and n_hat) differ."""
    return sum(a != b for a, b in zip(first.steps, second.steps)) + (first.n_hat != second.n_hat)


def test_crossover_takes_one_gene_of_the_other_parent_into_the_fitter_one():
    """Every new monotone single swap can come out, and nothing else; None when no swap is new."""
    space = SearchSpace.from_bounds(4, 1.0, 3.0)
    fitter, other = Candidate((100, 120, 140, 160), 0), Candidate((130, 115, 150, 200), 4)
    valid = {Candidate((100, 115, 140, 160), 0), Candidate((100, 120, 150, 160), 0),
             Candidate((100, 120, 140, 200), 0), Candidate((100, 120, 140, 160), 4)}  # 130 first breaks monotony
    rng = random.Random(0)
    children = {space.crossover(fitter, other, rng, is_new=lambda candidate: True) for _ in range(200)}
    assert children == valid
    seen = valid - {Candidate((100, 120, 150, 160), 0)}
    assert {space.crossover(fitter, other, rng, is_new=lambda c: c not in seen) for _ in range(20)} == \
        {Candidate((100, 120, 150, 160), 0)}
    assert space.crossover(fitter, other, rng, is_new=lambda candidate: candidate not in valid) is None


class RecordingSpace(SearchSpace):
    """A search space that records each crossover's parents, in the order the evolution passes them."""

    crossovers: list[tuple[Candidate, Candidate, Candidate | None]]

    def crossover(self, fitter, other, rng, is_new):
        child = super().crossover(fitter, other, rng, is_new)
        self.crossovers.append((fitter, other, child))
        return child


def test_crossover_children_are_built_from_the_fitter_parent():
    """The optimum lies at large factors, so the fitter of two parents is mostly the lexicographically larger: a
    crossover that sorted its parents by value (as before) would build most children from the less fit one."""
    space = RecordingSpace(**vars(SearchSpace.from_bounds(8, 1.0, 8.0)))
    object.__setattr__(space, "crossovers", [])
    initial = [space.snap([1.0] * 8), space.snap([8.0] * 8), space.snap([1 + i for i in range(8)])]
    for preset in (PRESETS["default"], PRESETS["paper"]):
        space.crossovers.clear()
        fitness = QuadraticFitness(space, documents=2)
        fitness.optimum = [700 + 10 * i for i in range(8)]
        evolution = Evolution(space, initial, preset, fitness, seed=1, max_evals=300)
        evolution.run()
        assert len(space.crossovers) >= 20
        for fitter, other, child in space.crossovers:
            assert (evolution.scores[fitter], fitter) <= (evolution.scores[other], other)
            if child is not None:
                assert genes_apart(child, fitter) == 1


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
                    racing=False, patience=None, n_hat_sweep=0, n_hat_sweep_from=0, n_hat_tries=0)
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


def test_a_time_budget_stops_the_search_within_one_document_evaluation():
    """A clock that advances one second per document evaluation; budgets that end in the initial
    population (before any evolution step), in the middle of a candidate, and during racing."""
    for budget in (0, 1, 7, 31, 100, 333):
        fitness = None

        def keep_going():
            return len(fitness.requests) < budget  # seconds so far < budget

        evolution, fitness = setup(keep_going=keep_going)
        result = evolution.run()
        assert len(fitness.requests) == budget  # not one document evaluation more
        assert result.stopped_by == "time_budget"
        assert result.evaluations == budget / 3
        complete = [c for c in evolution.initial if all((c, d) in evolution.results for d in range(3))]
        if budget < 3:
            assert result.best is None and result.best_perplexity == math.inf
        else:  # the best so far, among the candidates finished in time
            assert result.best_perplexity == min(s for s in evolution.scores.values())
            assert complete or result.iterations > 0
        if budget <= 16 * 3:  # the initial population costs 48 evaluations, then n_hat is swept on its fittest
            assert result.iterations == 0
        if budget >= 333:
            assert result.iterations > 0


def test_n_hat_choices_stay_below_the_window_and_nothing_beyond_it_is_written():
    """A fitness that rewards the largest n_hat: a 256-token window gets 128 at most, never 256, and the factor
    set of the winner is a valid factor file (the loader refuses n_hat >= the window)."""
    assert n_hat_choices(256)[-1] == 128 and 256 not in n_hat_choices(256) and n_hat_choices(257)[-1] == 256
    model = ModelFingerprint("LlamaForCausalLM", "window-256", 64, 10000.0, 256, 4, 192)
    task = long_search_task(model, 2048, n_hat=True)
    assert max(task.space.n_hat_choices) == 128
    fitness = QuadraticFitness(task.space, documents=2)
    fitness.mean_nll = lambda candidate, doc: 5.0 - candidate.n_hat / 1e3
    result = Evolution(task.space, task.initial, PRESETS["default"], fitness, seed=0, max_evals=60).run()
    assert all(candidate.n_hat < 256 for candidate, _ in fitness.requests)
    assert result.best.n_hat == 128
    written = replace(task.factor_set(result.best), provenance={"method": "search"})
    assert factor_set_from_json(written.to_json()).n_hat == 128


def test_n_hat_is_swept_on_the_fittest_initial_candidate_and_tried_on_mutated_children():
    """As LongRoPE's research code: every n_hat choice on the fittest initial candidates, some on each mutated child
    scored on all documents (every one without racing); a variant is kept only when it beats its candidate."""
    preset = Preset(population=6, parents=2, mutations=3, crossovers=1, iterations=2, mutation_p=0.3, racing=False,
                    patience=None, n_hat_sweep=1, n_hat_sweep_from=1, n_hat_tries=2)
    evolution, fitness = setup(preset=preset, documents=2)  # the fitness prefers n_hat 8
    result = evolution.run()
    candidates = list(dict.fromkeys(candidate for candidate, _ in fitness.requests))
    fittest = min(candidates[:6], key=lambda c: evolution.scores[c])
    assert candidates[6:19] == [replace(fittest, n_hat=n) for n in evolution.space.n_hat_choices if n != 0]
    # each iteration: 3 mutants, 2 variants of each (fewer when a variant was seen before), 1 crossover
    assert 6 + 13 + 2 * (3 + 3 * 1 + 1) <= result.evaluations <= 6 + 13 + 2 * (3 + 3 * 2 + 1)
    assert min(candidates[6:19], key=evolution.scores.get) == replace(fittest, n_hat=8)  # the fitness's optimum
    without_n_hat = SearchSpace.from_bounds(8, 1.0, 8.0, n_hat_choices=(0,))
    fitness = QuadraticFitness(without_n_hat, documents=2)
    evolution = Evolution(without_n_hat, [without_n_hat.snap([1.0] * 8), without_n_hat.snap([8.0] * 8)], preset,
                          fitness, seed=0)
    assert evolution.run().evaluations == 6 + 2 * (3 + 1)


def test_raced_n_hat_variants_finish_only_the_best_one_on_document_0():
    """Only one variant of a candidate can be kept, so with racing only its best on document 0, and only if that
    beats the candidate there, is scored on the other documents."""
    evolution, fitness = setup(max_evals=80)  # 16 initial candidates on 3 documents, then the n_hat sweep
    evolution.run()
    initial = list(dict.fromkeys(candidate for candidate, _ in fitness.requests))[:16]
    fittest = min(initial, key=lambda c: evolution.scores[c])
    sweep = fitness.requests[48 : 48 + 13]
    assert sweep == [(replace(fittest, n_hat=n), 0) for n in evolution.space.n_hat_choices if n != 0]
    finished = {c for c, doc in fitness.requests if doc == 2 and c.steps == fittest.steps and c != fittest}
    best = min((c for c, _ in sweep), key=lambda c: evolution.probe[c])
    assert finished == {best} and best.n_hat == 8  # the fitness prefers n_hat 8
