"""The evolution against a synthetic fitness: operators, both search spaces, n_hat, determinism, racing, the
confirmation of finalists, budgets, patience, progress (milliseconds each)."""

import math
import random
from dataclasses import replace

from longrope_convert.evolution import (
    PRESETS,
    Candidate,
    Evolution,
    Preset,
    SearchSpace,
    n_hat_choices,
    perplexity_of,
    rank_finalists,
)
from longrope_convert.factors import ModelFingerprint, factor_set_from_json
from longrope_convert.search import long_search_task
from longrope_convert.source_rope import critical_ramp

TOKENS = 100


class QuadraticFitness:
    """NLL grows with the squared distance of a candidate's steps from a hidden optimum; document d adds d/10, and
    with `disagree` its own optimum moves by up to that many steps per dimension (documents then rank differently)."""

    def __init__(self, space: SearchSpace, documents: int = 3, seed: int = 0, flat: bool = False,
                 disagree: int = 0) -> None:
        rng = random.Random(seed)
        self.optimum = sorted(rng.randint(space.low, space.high) for _ in range(space.dims))
        self.shifts = [[rng.randint(-disagree, disagree) for _ in range(space.dims)] for _ in range(documents)]
        self.documents, self.flat = documents, flat
        self.requests: list[tuple[Candidate, int]] = []  # every evaluation asked for, in order

    def mean_nll(self, candidate: Candidate, doc: int) -> float:
        if self.flat:
            return 4.0
        distance = sum((s - o - shift) ** 2 for s, o, shift in zip(candidate.steps, self.optimum, self.shifts[doc]))
        return 3.0 + distance / len(self.optimum) / 1e4 + doc / 10 + abs(candidate.n_hat - 8) / 1e3

    def nll(self, requests, on_result, keep_going) -> None:
        for candidate, doc in requests:
            if not keep_going():
                return
            self.requests.append((candidate, doc))
            on_result(candidate, doc, (self.mean_nll(candidate, doc) * TOKENS, TOKENS))


UNBOUNDED = replace(PRESETS["default"], max_evals=None)  # the default preset without its own budget


def setup(preset="default", documents=3, seed=0, flat=False, disagree=0, **budget):
    space = SearchSpace.from_bounds(8, 1.0, 8.0)
    initial = [space.snap([1.0] * 8), space.snap([8.0] * 8), space.snap([1 + i for i in range(8)])]
    fitness = QuadraticFitness(space, documents, seed, flat, disagree)
    evolution = Evolution(space, initial, PRESETS[preset] if isinstance(preset, str) else preset, fitness,
                          seed=seed, **budget)
    return evolution, fitness


def test_operators_keep_candidates_valid_and_new():
    """Property test over many seeds and random parents, in both spaces: every child is in the space (grid, bounds,
    monotone, the ramp below the critical dimension, n_hat choice), and the search never proposes a candidate
    twice."""
    for seed in range(200):
        rng = random.Random(seed)
        dims = rng.choice([4, 8, 32, 64])
        high = rng.choice([1.5, 2.5, 10.0])
        critical = rng.choice([0, rng.randrange(dims)])
        space = SearchSpace.from_bounds(dims, rng.uniform(1.0, high) if critical else 1.0, high, critical=critical)
        parents = [space.snap(sorted(rng.uniform(1, 12) for _ in range(dims)), rng.choice(range(300)))
                   for _ in range(4)]
        assert all(space.contains(p) for p in parents)
        for _ in range(20):
            child = space.mutate(rng.choice(parents), rng, rng.choice([0.1, 0.3, 1.0]), rng.choice([0.0, 0.5, 1.0]))
            assert space.contains(child)
            fitter, other = rng.sample(parents, 2)
            crossed = space.crossover(fitter, other, rng, is_new=lambda candidate: True)
            if fitter == other:  # nothing to take from the other
                assert crossed is None
                continue
            assert space.contains(crossed)  # two different monotone parents always allow a monotone single swap
            assert genes_apart(crossed, fitter, space) == 1
            assert genes_apart(crossed, other, space) == genes_apart(fitter, other, space) - 1


def genes_apart(first: Candidate, second: Candidate, space: SearchSpace | None = None) -> int:
    """How many genes (searched lambda_i steps, and n_hat) differ."""
    critical = space.critical if space else 0
    return (sum(a != b for a, b in zip(first.steps[critical:], second.steps[critical:]))
            + (first.n_hat != second.n_hat))


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
    # ranked on 2 of the 3 documents; the winner is the best of the finalists on all 3
    finalists = sorted(first.scores, key=lambda c: (first.scores[c], c))[:4]
    assert [c for _, c in result.finalists] == sorted(finalists, key=lambda c: (all_documents(first, c), c))
    assert (result.best_perplexity, result.best) == result.finalists[0]
    assert result.best_perplexity == min(all_documents(first, c) for c in finalists)


def all_documents(evolution: Evolution, candidate: Candidate) -> float:
    return perplexity_of(evolution.results[(candidate, doc)] for doc in range(evolution.fitness.documents))


def test_no_candidate_and_document_is_evaluated_twice():
    evolution, fitness = setup(preset="paper", max_evals=150)
    evolution.run()
    assert len(fitness.requests) == len(set(fitness.requests))
    assert all(evolution.space.contains(candidate) for candidate, _ in fitness.requests)


def test_racing_stops_a_child_at_the_first_document_where_it_could_no_longer_rank_among_the_parents():
    """Ranked on 3 documents of 4: a child goes on to the next document only while its mean NLL on the documents so
    far is at most the worst parent's there; the finalists alone see the fourth document."""
    preset = replace(UNBOUNDED, selection_documents=3)
    evolution, fitness = setup(preset=preset, documents=4, max_evals=150, disagree=100)
    evolution.run()
    asked = {}
    for candidate, doc in fitness.requests:
        asked.setdefault(candidate, []).append(doc)
    raced_out = [c for c, score in evolution.scores.items() if score == math.inf]
    stopped = {tuple(asked[c]) for c in raced_out}
    assert stopped == {(0,), (0, 1)}, "children lose on the first document and on the second"
    finished = [c for c, score in evolution.scores.items() if math.isfinite(score)]
    confirmed = {c for c, docs in asked.items() if 3 in docs}
    assert len(confirmed) == 4 and confirmed <= set(finished)
    assert all(sorted(asked[c]) == [0, 1, 2] for c in finished if c not in confirmed)


def test_the_evaluation_budget_holds_even_below_the_initial_population():
    """The budget covers the confirmation of the finalists: the evolution leaves room for it."""
    for max_evals in (1, 3, 16.5, 40):
        evolution, fitness = setup(max_evals=max_evals)
        result = evolution.run()
        assert result.evaluations <= max_evals
        assert result.evaluations >= min(max_evals, 16) - 1.5  # spent, not abandoned
        assert result.stopped_by == "max_evals"
        if max_evals >= 3:
            assert len(result.finalists) == min(4, sum(map(math.isfinite, evolution.scores.values())))
            assert all(all((c, doc) in evolution.results for doc in range(3)) for _, c in result.finalists)


def test_the_default_preset_has_its_own_budget_and_max_evals_replaces_it():
    assert PRESETS["default"].max_evals is not None and PRESETS["paper"].max_evals is None
    assert setup()[0].run().evaluations <= PRESETS["default"].max_evals
    assert setup(max_evals=30)[0].run().evaluations <= 30


def test_patience_stops_a_search_that_no_longer_improves():
    evolution, _ = setup(preset=UNBOUNDED, flat=True)
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
    every_document = replace(UNBOUNDED, selection_documents=None)  # ranked on all 3: nothing to confirm
    for budget in (0, 1, 7, 31, 100, 333):
        fitness = None

        def keep_going():
            return len(fitness.requests) < budget  # seconds so far < budget

        evolution, fitness = setup(preset=every_document, keep_going=keep_going)
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


def test_a_time_budget_can_leave_room_for_the_confirmation():
    """keep_going stops the evolution; keep_confirming lets the finalists be confirmed after it. Without that room
    the winner is a finalist confirmed in time, or none."""
    for budget in (40, 100):
        fitness = None
        evolution, fitness = setup(keep_going=lambda: len(fitness.requests) < budget, keep_confirming=lambda: True)
        result = evolution.run()
        confirmations = [(c, doc) for c, doc in fitness.requests if doc == 2]
        assert len(fitness.requests) == budget + len(confirmations) and len(confirmations) == 4
        assert result.best_perplexity == min(all_documents(evolution, c) for c, _ in confirmations)
        evolution, fitness = setup(keep_going=lambda: len(fitness.requests) < budget)
        result = evolution.run()
        assert len(fitness.requests) == budget and result.stopped_by == "time_budget"
        confirmed = [c for c in evolution.scores if all((c, doc) in evolution.results for doc in range(3))]
        assert result.best in confirmed or (result.best is None and not confirmed)


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
    beats the candidate there, is scored on the other ranking documents."""
    evolution, fitness = setup(max_evals=80)  # 16 initial candidates on 2 ranking documents, then the n_hat sweep
    evolution.run()
    initial = list(dict.fromkeys(candidate for candidate, _ in fitness.requests))[:16]
    fittest = min(initial, key=lambda c: evolution.scores[c])
    sweep = fitness.requests[32 : 32 + 13]
    assert sweep == [(replace(fittest, n_hat=n), 0) for n in evolution.space.n_hat_choices if n != fittest.n_hat]
    finished = {c for c, doc in fitness.requests if doc == 1 and c.steps == fittest.steps and c != fittest}
    best = min((c for c, _ in sweep), key=lambda c: evolution.results[(c, 0)])
    assert finished == {best} and best.n_hat == 8  # the fitness prefers n_hat 8


LLAMA3_8B = ModelFingerprint("LlamaForCausalLM", "Meta-Llama-3-8B", 128, 500000.0, 8192, 32, 4096)


def test_the_critical_space_searches_from_the_critical_dimension_on_and_ramps_below_it():
    """LongRoPE2's space for Llama-3-8B at 64k: dimensions 34-63 searched with lambda in [8, 10], the 34 below them
    the geometric ramp to lambda_34 (source_rope.critical_ramp on the grid), whatever the operators do."""
    task = long_search_task(LLAMA3_8B, 65536, n_hat=True, space="critical")
    space = task.space
    assert (space.critical, space.low, space.high, space.dims) == (34, 800, 1000, 64)
    rng = random.Random(0)
    children = list(task.initial)
    for _ in range(300):
        fitter, other = rng.sample(children[-8:] if len(children) > 8 else children, 2)
        children.append(space.mutate(fitter, rng, 0.3, 0.5))
        crossed = space.crossover(fitter, other, rng, is_new=lambda candidate: True)
        children += [crossed] if crossed else []
    for child in children:
        assert space.contains(child) and min(child.steps[34:]) >= 800
        ramp = critical_ramp(child.steps[34] * 0.01, 34, 34)
        assert child.steps[:34] == tuple(round(factor * 100) for factor in ramp)
    assert len({child.steps[34:] for child in children}) > 100  # the searched part moves
    # the seeds: the analytic sets snapped into the space (NTK and YaRN moved to the critical dimension and the
    # others: s from 34 on), and NTK's ramp continued past it, s^(i/34) up to the top bound
    assert task.initial[0].steps == (*task.initial[0].steps[:34], *[800] * 30)
    assert {c.steps for c in task.initial} == {task.initial[0].steps, task.initial[-1].steps}
    assert task.initial[-1].steps[35:] == tuple(min(round(8 ** (i / 34) * 100), 1000) for i in range(35, 64))
    full = long_search_task(LLAMA3_8B, 65536, n_hat=True)
    assert (full.space.critical, full.space.low) == (0, 100)


def test_a_block_move_shifts_neighbouring_dimensions_together_and_pushes_those_it_meets():
    """From a candidate flat at the extension, a block move lifts a run of neighbouring dimensions by one amount
    (pushing the dimensions above it to stay monotone), where a redraw between equal neighbours cannot move them."""
    space = SearchSpace.from_bounds(64, 8.0, 10.0, critical=34)
    flat = space.snap([8.0] * 64)
    redrawn = space.mutate(flat, random.Random(0), p=1.0)
    assert redrawn.steps[:63] == flat.steps[:63]  # every redraw but the last dimension's is pinned by its neighbours
    moved = 0
    for seed in range(100):
        steps = space.shift_block(flat.steps, random.Random(seed))
        changed = [i for i, (a, b) in enumerate(zip(flat.steps, steps)) if a != b]
        if changed:
            moved += 1
            assert changed == list(range(changed[0], 64)) and len({steps[i] for i in changed}) == 1
        assert all(a <= b for a, b in zip(steps[34:], steps[35:])) and min(steps[34:]) >= 800
    assert moved > 30  # a downward shift from the floor leaves it unchanged
    rising = space.snap([8.0 + i / 40 for i in range(64)])
    for seed in range(100):
        steps = space.shift_block(rising.steps, random.Random(seed))
        deltas = [b - a for a, b in zip(rising.steps, steps)]
        changed = [i for i, d in enumerate(deltas) if d]
        assert space.contains(Candidate(space.with_ramp(steps), 0)) and changed == list(range(changed[0], changed[-1] + 1))
        shift = max(set(deltas[i] for i in changed), key=[deltas[i] for i in changed].count)
        for i in changed:  # moved by the shift, or stopped at a bound, or pushed up to (down to) a neighbour
            assert deltas[i] == shift or steps[i] in (space.low, space.high, steps[i - 1], steps[min(i + 1, 63)])


def test_rank_finalists_ranks_on_any_fitness_and_asks_only_what_is_missing():
    """The final stage on its own: a second objective (another fitness) ranks the same finalists; what is known is
    not asked again, and a stop leaves out the unfinished."""
    space = SearchSpace.from_bounds(8, 1.0, 8.0)
    finalists = [space.snap([1.0 + i / 2] * 8) for i in range(5)]
    needle = QuadraticFitness(space, documents=2, seed=7)
    expected = sorted(finalists, key=lambda c: (sum(needle.mean_nll(c, d) for d in range(2)), c))
    results = {(finalists[0], 0): (needle.mean_nll(finalists[0], 0) * TOKENS, TOKENS)}
    counted = []
    ranked = rank_finalists(finalists, needle, range(2), results, on_evaluation=lambda: counted.append(1))
    assert [c for _, c in ranked] == expected and len(needle.requests) == len(counted) == 9
    assert (finalists[0], 0) not in needle.requests
    assert ranked[0][0] == perplexity_of(results[(expected[0], d)] for d in range(2))
    stopped = QuadraticFitness(space, documents=2, seed=7)
    assert len(rank_finalists(finalists, stopped, range(2), {}, keep_going=lambda: len(stopped.requests) < 5)) == 2


def test_the_confirmation_picks_the_finalist_best_on_every_document():
    """Ranked on 1 document of 4 that disagree: the winner is the finalist best on all 4, not the best on the first,
    and its perplexity is on all 4."""
    preset = replace(UNBOUNDED, selection_documents=1, finalists=6)
    evolution, fitness = setup(preset=preset, documents=4, max_evals=60, disagree=150)
    result = evolution.run()
    finalists = [c for _, c in result.finalists]
    assert len(finalists) == 6 and set(finalists) == set(sorted(evolution.scores, key=lambda c: (evolution.scores[c], c))[:6])
    assert result.best == min(finalists, key=lambda c: all_documents(evolution, c))
    assert result.best_perplexity == all_documents(evolution, result.best)
    assert result.evaluations <= 60
