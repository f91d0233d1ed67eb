"""Search quality at 8x on the testbeds: perplexity on held-out text, n_hat found, document forwards.

    python benchmarks/search_quality.py --before /work/wt/e4bb5fa --work ~/search-quality \\
        [--testbeds tiny-llama-256 tiny-llama3-256] [--seeds 0 1 2] [--paper-seeds 0] [--jobs 2]
        [--variants before after no-n-hat paper row] [--reuse LOG ...]
    python benchmarks/search_quality.py --work ~/search-cost --variants default critical default-no-n-hat \
        --issue18 /work/wt/a8868b3

Each variant (VARIANTS) searches each testbed (tests/testbed/<name>, window 256) for 2048 tokens on the
search text, 4 chapters of Tom Sawyer (tests/data/tom_sawyer_chapters.jsonl), once per seed; every
factor set found, and the classic sets, are then scored on the evaluation text, 4 stories of Sherlock
Holmes (tests/data/sherlock_adventures.jsonl), BOS + the first 2047 tokens of each. No search ever
sees the evaluation text, and the testbeds never saw either book.

One document forward = one (setting, document) evaluation the search asked for = one line of its
search log when nothing is replayed: baselines, raced probes, n_hat sweeps, confirmations of finalists and
the attention-scale confirmations all count. For each searched lambda of the issue-18 variants the second table
also gives the best n_hat on the search text among every choice (an exhaustive sweep done here, not counted in
the search's forwards): a search that finds it has searched n_hat as well as any strategy can for that lambda.

The cost table (variants default, critical and whatever else is asked for, with the paper preset and issue 18's
default where their results are in --work) gives, per run, the document forwards and the best perplexity on
all 4 search documents reached within 300 and 600 forwards and at the end (from the log, in its order: exact
for runs without --reuse), and the held-out perplexity of what each run wrote; then every analytic set on both
texts at its own attention scale and at LongRoPE's sqrt(1 + ln s / ln L) (what vLLM applies without
short_mscale / long_mscale).

Every search runs in its own process, with one thread, `--jobs` of them at a time: the "before" variant
with the code of the checkout given by --before (e.g. `git worktree add /work/wt/e4bb5fa e4bb5fa`), issue 18's
variants with --issue18's (a8868b3), the others with this checkout's. Results stay in --work: a search whose
result file exists is not run again, an interrupted one resumes from its log; new variants (a line in
VARIANTS, a new search option) reuse what is there. --reuse takes evaluations from other search logs of the
same model, data and scale below n_hat (an evaluation is a pure function of setting and document on one machine
and thread count), so only the time changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTBEDS = ROOT / "tests" / "testbed"
SEARCH_TEXT = ROOT / "tests" / "data" / "tom_sawyer_chapters.jsonl"
EVALUATION_TEXT = ROOT / "tests" / "data" / "sherlock_adventures.jsonl"
TARGET, DOCUMENTS = 2048, 4


@dataclass(frozen=True)
class Variant:
    label: str
    code: str  # "before": the --before checkout; "issue18": the --issue18 checkout; "this": this one
    preset: str = "default"
    settings: dict[str, Any] = field(default_factory=dict)  # SearchRun keyword arguments
    paper_seeds: bool = False  # run with --paper-seeds instead of --seeds
    n_hat_sweeps: bool = True  # score every n_hat choice on its lambda at both scales (the second table)


VARIANTS = {
    "before": Variant("before the fixes (e4bb5fa), default preset", "before"),
    "after": Variant("after, default preset", "issue18"),
    "no-n-hat": Variant("after, default preset, --no-n-hat", "issue18", settings={"n_hat": False}),
    "row": Variant("after, default preset, long mscale below n̂ (n_hat_mscale row)", "issue18",
                   settings={"n_hat_mscale": "row"}),
    "paper": Variant("after, --preset paper", "issue18", preset="paper", paper_seeds=True),
    # the paper preset searches n_hat: 5 tries per mutated child make it up to 4,604 evaluations on the testbeds;
    # this machine got 1,200 of them (its run resumes the paper variant's log with the cap)
    "paper-1200": Variant("--preset paper, stopped at 1,200 evaluations", "issue18", preset="paper",
                          settings={"max_evals": 1200}, paper_seeds=True),
    # issue 21: the default preset's budget, racing and confirmation, in each search space
    # (measured before the default preset stopped searching n_hat: "default" and "critical" ask for it)
    "default": Variant("default preset, full space, --n-hat", "this", settings={"space": "full", "n_hat": True},
                       n_hat_sweeps=False),
    "critical": Variant("default preset, critical space, --n-hat", "this",
                        settings={"space": "critical", "n_hat": True}, n_hat_sweeps=False),
    "default-no-n-hat": Variant("default preset, full space, n̂ not searched (the default)", "this",
                                settings={"space": "full", "n_hat": False}, n_hat_sweeps=False),
    # issue 26: the needle-driven objectives, all else as the default (benchmarks/needle_objective.py compares)
    "needle": Variant("default preset, --objective needle", "this",
                      settings={"space": "full", "n_hat": False, "objective": "needle"}, n_hat_sweeps=False),
    "ppl+needle": Variant("default preset, --objective ppl+needle", "this",
                          settings={"space": "full", "n_hat": False, "objective": "ppl+needle"}, n_hat_sweeps=False),
    "needle-single": Variant("default preset, --objective needle --needle-task niah_single", "this",
                             settings={"space": "full", "n_hat": False, "objective": "needle",
                                       "needle_task": "niah_single"}, n_hat_sweeps=False),
    "ppl+needle-single": Variant("default preset, --objective ppl+needle --needle-task niah_single", "this",
                                 settings={"space": "full", "n_hat": False, "objective": "ppl+needle",
                                           "needle_task": "niah_single"}, n_hat_sweeps=False),
}
# "row" is left out unless asked for: the second table measures both scales on every searched lambda for less.
DEFAULT_VARIANTS = ("before", "after", "no-n-hat", "paper")
COST_VARIANTS = ("default", "critical", "default-no-n-hat")  # the cost table's own; it shows "paper" and "after" too when in --work
BASELINES = {"none": "none (RoPE unchanged)", "pi": "PI", "ntk": "NTK", "yarn": "YaRN", "llama3": "llama3"}


def reusable_evaluations(logs: list[Path], header: dict[str, Any], n_hat_mscale: str) -> dict:
    """The evaluations of `logs` made on the same model, documents and target as the log `header`; those of
    candidates with n_hat > 0 only from logs with the same scale below n_hat (absent in a log: "row")."""
    from longrope_convert.search_log import logged_evaluations

    same = ("model_files", "documents", "target_length", "eval_length", "mode", "base_long_factor")
    known = {}
    for log in logs:
        logged = json.loads(log.read_text().split("\n", 1)[0])
        if any(logged.get(key) != header.get(key) for key in same):
            continue
        convention = logged.get("n_hat_mscale") or "row"
        known.update({(setting, doc): nll for (setting, doc), nll in logged_evaluations(log).items()
                      if convention == n_hat_mscale or n_hat_of(setting) == 0})
    return known


def n_hat_of(setting: str) -> int:
    """The n_hat of a search log's setting ("n4:100,..." or "attention:rule:n4:100,..."; 0 for baselines)."""
    return next((int(part[1:]) for part in setting.split(":") if part[:1] == "n" and part[1:].isdigit()), 0)


def search_one(job: dict[str, Any]) -> None:
    """One search, in this process (launched by `launch` with the variant's code first on the path)."""
    import torch

    from longrope_convert.search import SearchRun
    from longrope_convert.source import read_source

    torch.set_num_threads(1)
    log, result = Path(job["log"]), Path(job["result"])
    run = SearchRun(source=read_source(TESTBEDS / job["testbed"]), data=[str(SEARCH_TEXT)], target=TARGET,
                    documents=DOCUMENTS, preset=job["preset"], seed=job["seed"], log_path=log, resume=log.exists(),
                    **job["settings"])
    header = json.loads(log.read_text().split("\n", 1)[0])
    n_hat_mscale = getattr(run.task.base, "n_hat_mscale", "row")  # "row" where the code predates the key
    for key, nll in reusable_evaluations([Path(p) for p in job["reuse"]], header, n_hat_mscale).items():
        run.log.known.setdefault(key, nll)
    forwards = 0

    def count() -> None:
        nonlocal forwards
        forwards += 1

    factor_set, summary = run.execute(on_evaluation=count)
    keep = ("method", "best_perplexity", "search_best_perplexity", "evaluations", "iterations", "stopped_by",
            "n_hat", "baselines", "seconds")
    result.write_text(json.dumps({"factor_set": factor_set.to_json(), "forwards": forwards,
                                  **{key: summary[key] for key in keep}}, indent=1))


def stage(job: dict[str, Any]) -> str | None:
    """What a job needs next: "search", "score" (its factor set on both texts: `score_one`) or nothing."""
    result = Path(job["result"])
    if not result.exists():
        return "search"
    done = json.loads(result.read_text())
    return None if "held_out" in done and ("sweeps" in done or not job["n_hat_sweeps"]) else "score"


def launch(jobs: list[dict[str, Any]], parallel: int, checkouts: dict[str, Path]) -> None:
    """Search, then score, every job not done yet, `parallel` processes at a time, each on one thread: a search
    with its variant's code (`checkouts`: "before", "issue18"), the scoring with this checkout's. A process still
    running from an earlier launch (its .pid file names a live process of that job) is waited for, not started
    again."""
    waiting = [job for job in jobs if stage(job)]
    running: dict[int, dict] = {}  # process id -> job
    children: dict[int, subprocess.Popen] = {}
    while waiting or running:
        while waiting and len(running) < parallel:
            job = waiting.pop(0)
            pid_file = Path(job["result"]).with_suffix(".pid")
            pid = int(pid_file.read_text()) if pid_file.exists() else None
            if pid is None or not runs_job(pid, job):
                step = stage(job)
                code = checkouts.get(job["code"], ROOT) if step == "search" else ROOT
                env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
                with open(Path(job["result"]).with_suffix(".stderr"), "a") as stderr:
                    process = subprocess.Popen([sys.executable, __file__, f"--{step}-one", json.dumps(job)], env=env,
                                               stdout=subprocess.DEVNULL, stderr=stderr)
                pid, children[process.pid] = process.pid, process
                pid_file.write_text(str(pid))
            running[pid] = job
            print(f"running {Path(job['result']).stem} (process {pid})", flush=True)
        time.sleep(5)
        for pid, job in list(running.items()):
            if pid in children and children[pid].poll() is None or pid not in children and runs_job(pid, job):
                continue
            del running[pid]
            if stage(job) == "search":
                raise SystemExit(f"{Path(job['result']).stem} failed: see {Path(job['result']).with_suffix('.stderr')}")
            if stage(job) == "score":
                waiting.insert(0, job)
            print(f"{Path(job['result']).stem}: {'scored' if stage(job) is None else 'searched'}", flush=True)


def runs_job(pid: int, job: dict[str, Any]) -> bool:
    """Whether process `pid` is alive and works on this job."""
    try:
        return job["result"] in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


class Scorer:
    """Perplexity of factor sets on a testbed's search and evaluation documents (this checkout's code)."""

    def __init__(self, testbed: str) -> None:
        import torch
        from transformers import AutoTokenizer

        from longrope_convert.convert import longrope_config
        from longrope_convert.documents import read_documents
        from longrope_convert.factors import source_factor_set
        from longrope_convert.perplexity import load_longrope_model, tokenized_documents
        from longrope_convert.source import read_source

        torch.set_num_threads(1)
        self.source = read_source(TESTBEDS / testbed)
        folder = self.source.folder
        self.model = load_longrope_model(folder, longrope_config(self.source.config,
                                                                 source_factor_set(self.source.fingerprint, TARGET)))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        self.documents = {name: tokenized_documents(tokenizer, read_documents([str(path)]), TARGET, DOCUMENTS)[0]
                          for name, path in (("search", SEARCH_TEXT), ("evaluation", EVALUATION_TEXT))}

    def perplexity(self, factor_set, text: str) -> float:
        from longrope_convert.evolution import perplexity_of
        from longrope_convert.search import document_nll

        return perplexity_of(document_nll(self.model, factor_set, ids) for ids in self.documents[text])


def score_one(job: dict[str, Any]) -> None:
    """Add to a search's result its perplexity on the evaluation text, and for each scale below n_hat ("row",
    "short") its lambda with every n_hat choice on the search text, and on the evaluation text at the n_hat
    that is best on the search text (chosen without looking at the evaluation text)."""
    from longrope_convert.evolution import n_hat_choices
    from longrope_convert.factors import factor_set_from_json

    scorer = Scorer(job["testbed"])
    path = Path(job["result"])
    result = json.loads(path.read_text())
    factor_set = factor_set_from_json(result["factor_set"])
    result["held_out"] = scorer.perplexity(factor_set, "evaluation")
    if not job["n_hat_sweeps"]:
        path.write_text(json.dumps(result, indent=1))
        return
    unscaled = replace(factor_set, n_hat=0)
    at_zero = {"search": scorer.perplexity(unscaled, "search"), "evaluation": scorer.perplexity(unscaled, "evaluation")}
    sweeps = {}
    for convention in ("row", "short"):
        search = {str(n): at_zero["search"] if n == 0 else
                  scorer.perplexity(replace(factor_set, n_hat=n, n_hat_mscale=convention), "search")
                  for n in n_hat_choices(scorer.source.fingerprint.original_max_position_embeddings)}
        chosen = int(min(search, key=search.get))
        evaluation = at_zero["evaluation"] if chosen == 0 else scorer.perplexity(
            replace(factor_set, n_hat=chosen, n_hat_mscale=convention), "evaluation")
        sweeps[convention] = {"search": search, "chosen": chosen, "evaluation": evaluation}
    result["sweeps"], result["at_n_hat_0"] = sweeps, at_zero
    path.write_text(json.dumps(result, indent=1))


def table(testbed: str, variants: dict[str, Variant], results: dict[str, dict[int, dict]],
          baselines: dict[str, dict[str, float]]) -> str:
    """The markdown tables of one testbed: a row per variant (seeds, then the median) and per classic set; then the
    two scales below n_hat on each searched lambda."""
    lines = [f"**{testbed}**, 256 → 2048 tokens\n",
             "| factors | seeds | held-out ppl (Sherlock) per seed | median | search ppl (Tom Sawyer), median "
             "| n̂ found | best n̂ for its λ (search text) | document forwards per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, variant in variants.items():
        runs = results.get(name) or {}
        if not runs or not variant.n_hat_sweeps:  # the cost table shows the others
            continue
        seeds = sorted(runs)
        held_out = [runs[s]["held_out"] for s in seeds]
        own = [runs[s]["sweeps"][runs[s]["factor_set"].get("n_hat_mscale", "row")]["chosen"] for s in seeds]
        lines.append(f"| {variant.label} | {', '.join(map(str, seeds))} | {' / '.join(f'{p:.3f}' for p in held_out)} "
                     f"| **{statistics.median(held_out):.3f}** "
                     f"| {statistics.median(runs[s]['best_perplexity'] for s in seeds):.3f} "
                     f"| {' / '.join(str(runs[s]['factor_set']['n_hat']) for s in seeds)} "
                     f"| {' / '.join(map(str, own))} | {' / '.join(str(runs[s]['forwards']) for s in seeds)} |")
    for name, label in BASELINES.items():
        measured = baselines[name]
        lines.append(f"| {label} | | | {measured['held_out']:.3f} | {measured['search']:.3f} | 0 | | |")
    lines += ["", "| λ of | scale below n̂ | n̂ chosen on the search text, per seed | held-out ppl there, per seed "
              "| median | median at n̂ = 0 |", "|---|---|---|---|---|---|"]
    for name, variant in variants.items():
        runs = [run for _, run in sorted((results.get(name) or {}).items())]
        for convention in ("row", "short") if runs else ():
            sweeps = [run["sweeps"][convention] for run in runs]
            held_out = [sweep["evaluation"] for sweep in sweeps]
            lines.append(f"| {variant.label} | {convention} | {' / '.join(str(sweep['chosen']) for sweep in sweeps)} "
                         f"| {' / '.join(f'{p:.3f}' for p in held_out)} | **{statistics.median(held_out):.3f}** "
                         f"| {statistics.median(run['at_n_hat_0']['evaluation'] for run in runs):.3f} |")
    return "\n".join(lines)


FORWARD_MARKS = (300, 600)  # the cost table's "best within" columns
COST_ROWS = ("default", "default-no-n-hat", "critical", "paper", "paper-1200", "after", "before")  # in this order, those with results in --work


def best_within(log: Path, marks: tuple[int, ...] = FORWARD_MARKS) -> dict[str, float | None]:
    """The best perplexity on every search document among the candidates a search log has scored on all of them,
    after each mark of document forwards (the log's lines, baselines included, in order) and at the end."""
    from longrope_convert.evolution import perplexity_of

    header, *lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    documents, scored, best, reached = len(header["documents"]), {}, None, {}
    for forwards, entry in enumerate(lines, 1):
        if not entry["setting"].startswith("baseline:"):
            scored.setdefault(entry["setting"], {})[entry["doc"]] = (entry["nll_sum"], entry["tokens"])
            if len(scored[entry["setting"]]) == documents:
                perplexity = perplexity_of(scored[entry["setting"]].values())
                best = perplexity if best is None else min(best, perplexity)
        if forwards in marks:
            reached[str(forwards)] = best
    return {**{str(mark): reached.get(str(mark), best) for mark in marks}, "end": best}


def median_text(values: list[float | None], digits: int = 3) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):.{digits}f}" if known else "–"


def cost_table(testbed: str, results: dict[str, dict[int, dict]], logs: dict[str, dict[int, Path]],
               baselines: dict[str, dict[str, float]], critical: int, dims: int) -> str:
    """Issue 21's table of one testbed: per search (COST_ROWS with results), the document forwards, the best search
    perplexity within FORWARD_MARKS forwards and at the end, and the held-out perplexity, each seed and the median;
    the held-out median against the paper preset's and the best of PI, NTK and YaRN; then the classic sets."""
    classic = min(baselines[name]["held_out"] for name in ("pi", "ntk", "yarn"))
    paper_variant = "paper" if results.get("paper") else "paper-1200"
    paper = results.get(paper_variant) or {}
    paper_held_out = statistics.median(run["held_out"] for run in paper.values()) if paper else None
    marks = " / ".join(map(str, FORWARD_MARKS))
    lines = [f"**{testbed}**, 256 → 2048 tokens (critical dimension {critical} of {dims})\n",
             f"| search | seeds | document forwards | best search ppl within {marks} forwards, at the end (median) "
             f"| search ppl per seed | n̂ found | held-out ppl per seed | held-out median | ÷ {paper_variant}'s "
             "| ÷ best of PI/NTK/YaRN |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in (name for name in COST_ROWS if results.get(name)):
        runs, seeds = results[name], sorted(results[name])
        within = [best_within(logs[name][seed]) for seed in seeds]
        held_out = statistics.median(runs[s]["held_out"] for s in seeds)
        searched = " / ".join(f"{runs[s]['best_perplexity']:.3f}" for s in seeds)
        held_out_each = " / ".join(f"{runs[s]['held_out']:.3f}" for s in seeds)
        best = " / ".join(median_text([w[key] for w in within]) for key in (*map(str, FORWARD_MARKS), "end"))
        to_paper = f"{held_out / paper_held_out:.4f}" if paper_held_out else "–"
        lines.append(f"| {VARIANTS[name].label} | {', '.join(map(str, seeds))} "
                     f"| {' / '.join(str(runs[s]['forwards']) for s in seeds)} | {best} | {searched} "
                     f"| {' / '.join(str(runs[s]['factor_set']['n_hat']) for s in seeds)} | {held_out_each} | **{held_out:.3f}** | {to_paper} | {held_out / classic:.4f} |")
    for name, label in BASELINES.items():
        measured = baselines[name]
        lines.append(f"| {label} | | 0 | | {measured['search']:.3f} | 0 | | {measured['held_out']:.3f} | "
                     f"| {measured['held_out'] / classic:.4f} |")
    return "\n".join(lines)


def analytic_table(testbed: str, scorer: Scorer, cache: Path) -> str:
    """Every analytic set (factors.ANALYTIC_METHODS) on both texts at its own attention scale and at LongRoPE's
    sqrt(1 + ln s / ln L): what decides the init of a conversion without searched factors. Cached in `cache`."""
    from longrope_convert.factors import ANALYTIC_METHODS, analytic_factor_set
    from longrope_convert.source_rope import longrope_attention_factor

    measured = json.loads(cache.read_text()) if cache.exists() else {}
    longrope_scale = longrope_attention_factor(TARGET / 256, 256)
    lines = [f"**{testbed}**: analytic sets at 8x (perplexity; attention scale in brackets)\n",
             f"| set | own scale: held-out | own scale: search text | LongRoPE's scale ({longrope_scale:.4f}): "
             "held-out | LongRoPE's scale: search text |", "|---|---|---|---|---|"]
    for method in ANALYTIC_METHODS:
        own = analytic_factor_set(method, scorer.source.fingerprint, TARGET)
        for key, factor_set in ((method, own), (f"{method}@longrope", replace(own, long_mscale=longrope_scale))):
            if key not in measured:
                measured[key] = {text: scorer.perplexity(factor_set, text) for text in ("evaluation", "search")}
                cache.write_text(json.dumps(measured, indent=1))
        mine, theirs = measured[method], measured[f"{method}@longrope"]
        lines.append(f"| {method} ({own.long_mscale:.4f}) | {mine['evaluation']:.3f} | {mine['search']:.3f} "
                     f"| {theirs['evaluation']:.3f} | {theirs['search']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--before", type=Path, default=None, help="checkout of the code before the fixes")
    parser.add_argument("--issue18", type=Path, default=None, help="checkout of issue 18's code (a8868b3)")
    parser.add_argument("--testbeds", nargs="+", default=["tiny-llama-256", "tiny-llama3-256"])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--paper-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reuse", type=Path, nargs="*", default=[])
    parser.add_argument("--search-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--score-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.search_one:
        return search_one(json.loads(args.search_one))
    if args.score_one:
        return score_one(json.loads(args.score_one))
    if args.work is None:
        parser.error("--work is required")
    variants = {name: VARIANTS[name] for name in args.variants}
    checkouts = {name: path for name, path in (("before", args.before), ("issue18", args.issue18)) if path}
    for name, variant in variants.items():
        if variant.code != "this" and variant.code not in checkouts:
            parser.error(f"the '{name}' variant needs --{variant.code} (a checkout of that code)")
    args.work.mkdir(parents=True, exist_ok=True)
    # seed by seed (the paper preset last), so that a run cut short has every variant at its first seeds on every
    # testbed
    runs = sorted(((name, seed) for name, variant in variants.items()
                   for seed in (args.paper_seeds if variant.paper_seeds else args.seeds)),
                  key=lambda run: (variants[run[0]].paper_seeds, run[1]))
    jobs = []
    for (name, seed), testbed in ((run, testbed) for run in runs for testbed in args.testbeds):
        variant, stem = variants[name], args.work / f"{testbed}-{name}-{seed}"
        jobs.append({"testbed": testbed, "code": variant.code, "preset": variant.preset, "seed": seed,
                     "settings": variant.settings, "log": str(stem.with_suffix(".log.jsonl")),
                     "result": str(stem.with_suffix(".json")), "reuse": [str(p) for p in args.reuse],
                     "variant": name, "n_hat_sweeps": variant.n_hat_sweeps})
    launch(jobs, args.jobs, checkouts)

    from longrope_convert.factors import baseline_factor_sets
    from longrope_convert.source_rope import critical_dimension

    report = []
    for testbed in args.testbeds:
        first = len(report)
        scorer = Scorer(testbed)
        results: dict[str, dict[int, dict]] = {}
        for job in (job for job in jobs if job["testbed"] == testbed):
            results.setdefault(job["variant"], {})[job["seed"]] = json.loads(Path(job["result"]).read_text())
        baselines = {name: {"held_out": scorer.perplexity(factor_set, "evaluation"),
                            "search": scorer.perplexity(factor_set, "search")}
                     for name, factor_set in baseline_factor_sets(scorer.source.fingerprint, TARGET).items()}
        if any(name in COST_VARIANTS for name in variants):
            # the cost table also shows the other searches whose scored results are in --work
            logs: dict[str, dict[int, Path]] = {}
            for result in sorted(args.work.glob(f"{testbed}-*-*.json")):
                name, seed = result.stem[len(testbed) + 1 :].rsplit("-", 1)
                scored = json.loads(result.read_text())
                if name in COST_ROWS and "held_out" in scored and result.with_suffix(".log.jsonl").exists():
                    results.setdefault(name, {})[int(seed)] = scored
                    logs.setdefault(name, {})[int(seed)] = result.with_suffix(".log.jsonl")
            model = scorer.source.fingerprint
            critical = critical_dimension(model.head_dim, model.rope_theta, model.original_max_position_embeddings)
            report.append(cost_table(testbed, results, logs, baselines, critical, model.head_dim // 2))
            report.append(analytic_table(testbed, scorer, args.work / f"{testbed}-analytic.json"))
        else:
            report.append(table(testbed, variants, results, baselines))
        print("\n\n".join(report[first:]) + "\n", flush=True)
    (args.work / "table.md").write_text("\n\n".join(report) + "\n")
    print(f"(also in {args.work / 'table.md'}; the machine's load: {os.getloadavg()})")


if __name__ == "__main__":
    main()
