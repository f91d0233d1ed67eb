"""The whole job of `longrope-convert convert`, planned as data and then carried out: search the factors
(optional), convert, extend GGUF files (optional), evaluate (optional), refresh the card, push (optional).

plan_job checks everything that can be checked before the long work (the Hub login, the data, the output
places, the source: opened once) and returns a JobPlan; a dry run shows it (JobPlan.summary, JobPlan.lines),
run_job carries it out. Without a search the conversion is planned in full (convert.ConversionPlan: every file,
its size, what is downloaded); with one, the search is planned (its caps: evaluations and document forwards)
and the conversion is planned once the search has written its factors. The file naming rules of a job live
here: the output folder (convert.default_output), the searched factor file next to it, its log next to that.

Messages reach the caller through one callback, `status`; long steps (the search, the evaluation) report
progress through a `Progress` (no_progress by default).
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .convert import (
    ConversionPlan,
    ConversionResult,
    check_conversion_output,
    default_output,
    plan_conversion,
    write_checkpoint,
    write_planned,
)
from .errors import LongRoPEError
from .evolution import DEFAULT_OBJECTIVE, OBJECTIVE_LABELS
from .factors import CLASSIC_METHODS, FactorSet
from .fetch import open_source
from .needles import OBJECTIVE_TASK
from .preflight import check_data, check_push, check_search_outputs
from .progress import StepTimer
from .publish import PushResult, loading_snippet, push_folder
from .source import SourceModel

Status = Callable[[str], None]
# progress(what, total, unit) opens a display of `total` steps of `what` ("search" or "eval"), each step one of
# `unit` ("document evaluations", "document forwards and needle prompts"); it yields step(note), which advances it
# by one and shows `note` (the best perplexity so far and the time left, progress.StepTimer's estimate, or "").
Progress = Callable[[str, int, str], AbstractContextManager[Callable[[str], None]]]


def quiet(message: str) -> None:
    """The default status callback: says nothing."""


@contextmanager
def no_progress(what: str, total: int, unit: str) -> Iterator[Callable[[str], None]]:
    """The default Progress: shows nothing."""
    yield lambda note: None


def default_factors_file(source_name: str, target: int | None) -> Path:
    """Where `search` writes its factor file by default: ./<source name>-<target>.factors.json (-short.factors.json
    for a short-factor search)."""
    return Path(f"{Path(source_name).name}-{target or 'short'}.factors.json")


def factors_file_for(output: Path) -> Path:
    """Where a job's search writes its factor file: next to the output folder, <output>.factors.json."""
    return output.with_name(output.name + ".factors.json")


def search_log_for(factors_file: Path) -> Path:
    """A search's default log: next to its factor file, <factor file>.log.jsonl."""
    return factors_file.with_name(factors_file.name + ".log.jsonl")


def resume_command(arguments: Sequence[str], log: Path) -> str:
    """The command line that continues an interrupted search: the same arguments, with --resume LOG."""
    kept, skip = [], False
    for argument in arguments:
        if skip or argument.startswith("--resume="):
            skip = False
            continue
        skip = argument == "--resume"
        if not skip:
            kept.append(argument)
    launcher = "longrope-convert"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '1')} -m longrope_convert"
    return f"{launcher} {shlex.join([*kept, '--resume', str(log)])}"


@dataclass(frozen=True)
class SearchSettings:
    """How a search runs (search.plan_search's settings): `documents` per evaluation, the evolution's `preset`
    ("default" or "paper") and `space` ("full" or "critical"; None: evolution.DEFAULT_SPACE), its budgets
    (`max_evals` evaluations, one = a candidate on every document, None: the preset's; `time_budget` seconds from
    the first evaluation), `seed`, whether n_hat is searched, the factors' upper bound `max_factor` (None: 1.25 x
    the extension), whether the baselines are measured on the same documents, and the `objective` the fitness
    measures ("ppl": perplexity of the documents; "needle": of the answer tokens of `needle_task` items built on
    them; "ppl+needle": perplexity, its fittest ranked on those items)."""

    documents: int = 4
    preset: str = "default"
    space: str | None = None
    max_evals: float | None = None
    time_budget: float | None = None
    seed: int = 0
    n_hat: bool | None = None  # None: the preset's (paper: searched; default: not)
    max_factor: float | None = None
    baselines: bool = True
    objective: str = DEFAULT_OBJECTIVE  # "ppl", "needle" or "ppl+needle" (evolution.OBJECTIVES)
    needle_task: str = OBJECTIVE_TASK  # the needle items' task (one of needles.RULER_TASKS)


@dataclass
class SearchStep:
    """A search of the factors on `data` before converting, written to `factors_file`, logged in `log`."""

    data: list[str]
    factors_file: Path
    log: Path
    resume: bool  # continue the search recorded in `log`
    settings: SearchSettings
    device_map: str | None = None
    caps: str | None = None  # the search's caps in words (SearchPlan.caps_line), planned by a dry run

    def summary(self) -> dict[str, Any]:
        return {"data": self.data, "factors": str(self.factors_file), "log": str(self.log), "resume": self.resume,
                **asdict(self.settings), "caps": self.caps}


@dataclass
class EvaluationStep:
    """Perplexity of the converted checkpoint and the baselines at `lengths` (tokens) on `data`, written to its
    eval/ folder and card: what `longrope-convert eval` runs with --baselines --card."""

    lengths: list[int]
    data: list[str]
    device_map: str | None = None

    @property
    def methods(self) -> list[str]:
        """What is measured at every length: the checkpoint's factors, the source's RoPE unchanged ("none") and
        the classic sets composed on it (evaluate.comparison_sets, factors.baseline_factor_sets)."""
        return ["checkpoint", "none", *CLASSIC_METHODS]

    def command(self, checkpoint: Path) -> str:
        """The `eval` command that runs this step on `checkpoint`."""
        return (f"longrope-convert eval {shlex.quote(str(checkpoint))} --lengths {','.join(map(str, self.lengths))} "
                + " ".join(f"--data {shlex.quote(entry)}" for entry in self.data) + " --baselines --card")

    def summary(self) -> dict[str, Any]:
        return {"lengths": self.lengths, "data": self.data, "methods": self.methods,
                "measurements": len(self.methods) * len(self.lengths)}


@dataclass
class PushStep:
    """A push of the output folder to the Hub repo `repo` as one commit (publish.push_folder)."""

    repo: str
    private: bool = False
    branch: str | None = None
    commit_message: str | None = None


@dataclass
class JobPlan:
    """The whole job, computed once: a dry run shows it, run_job carries it out."""

    source: str  # as given: a folder or a Hub repo id
    revision: str | None
    target: int  # tokens
    output: Path
    overwrite: bool
    copy_weights: bool
    factors: str | None  # as given (a file, a folder, an analytic method), None for the default or the search's
    model: SourceModel | None  # opened (and downloaded) for a search; else the conversion's plan holds it
    conversion: ConversionPlan | None  # None while a search has to find the factors first
    search: SearchStep | None = None
    gguf_pattern: str | None = None  # the source's GGUF files to extend into the output folder
    evaluation: EvaluationStep | None = None
    push: PushStep | None = None
    arguments: list[str] | None = None  # the command line that made it, for the resume hint of a search

    def summary(self) -> dict[str, Any]:
        """The plan as JSON data: the conversion's files (ConversionPlan.summary), and each other step."""
        if self.conversion is not None:
            summary = self.conversion.summary()
        else:  # what the search writes decides the conversion's generated files
            summary = {"source": self.source, "download": None, "download_bytes": None, "output": str(self.output),
                       "factors": {"method": None, "origin": str(self.search.factors_file),
                                   "target_length": self.target},
                       "write": None, "write_bytes": None}
        summary.update(source=self.source, revision=self.revision)
        summary["search"] = self.search.summary() if self.search else None
        summary["gguf"] = self.gguf_pattern
        summary["evaluation"] = self.evaluation.summary() if self.evaluation else None
        summary["push"] = None if self.push is None else {
            "repo": self.push.repo, "branch": self.push.branch or "main", "private": self.push.private,
            "files": len(self.conversion.files) if self.conversion else None, "bytes": summary["write_bytes"]}
        return summary

    def lines(self) -> list[str]:
        """The plan in words, a line per step, for a dry run."""
        lines = []
        if self.search is not None:
            lines.append(f"dry run: {self.search.caps or 'search: caps known once the source is downloaded'}; "
                         f"factors to {self.search.factors_file}, log {self.search.log}")
        if self.conversion is not None:
            plan, summary = self.conversion, self.conversion.summary()
            lines.append(f"dry run: download {len(plan.download)} files ({summary['download_bytes'] / 1e9:.2f} GB); "
                         f"write {plan.output} ({len(plan.files)} files, {summary['write_bytes'] / 1e9:.2f} GB); "
                         f"factors {plan.factors_origin}"
                         + (f"; push to {self.push.repo} ({self.push.branch or 'main'})" if self.push else ""))
        else:
            lines.append(f"dry run: write {self.output} with the searched factors"
                         + (f"; push to {self.push.repo} ({self.push.branch or 'main'})" if self.push else ""))
        if self.gguf_pattern:
            lines.append(f"dry run: extend the source's GGUF files matching '{self.gguf_pattern}' into {self.output}")
        if self.evaluation is not None:
            step = self.evaluation
            lines.append(f"dry run: evaluate perplexity at {', '.join(map(str, step.lengths))} tokens on "
                         f"{', '.join(step.data)} for {', '.join(step.methods)} ({len(step.methods) * len(step.lengths)} "
                         "measurements), then refresh the card")
        return lines


@dataclass
class SearchOutcome:
    """What a search wrote: the factor file, its log, the factor set and the search's summary (perplexities,
    evaluations, baselines)."""

    factors_file: Path
    log: Path
    factor_set: FactorSet  # its provenance says how it was found (data, evaluations, perplexities, budget)
    summary: dict[str, Any]  # method, best_perplexity, baselines {name: perplexity}, evaluations, seconds, ...
    checkpoint: ConversionResult | None = None  # the conversion made with it, when asked for


@dataclass
class JobResult:
    """What a job did: the conversion, and each optional step's result (None when not asked for)."""

    plan: JobPlan
    conversion: ConversionResult
    search: SearchOutcome | None = None
    gguf: list[Any] = field(default_factory=list)  # gguf.GGUFResult, each written into the output folder
    evaluation: dict[str, Any] | None = None  # eval/results.json as written
    push: PushResult | None = None

    @property
    def output(self) -> Path:
        return self.conversion.output

    @property
    def factor_set(self) -> FactorSet:
        return self.conversion.factor_set

    def summary(self) -> dict[str, Any]:
        """The job as JSON data (what `convert --json` prints)."""
        summary = self.conversion.summary()
        if self.gguf:
            summary["gguf"] = [{**result.summary(), "output": str(self.output / result.output.name)}
                               for result in self.gguf]
        if self.search:
            summary["search"] = {"factors": str(self.search.factors_file), **self.search.summary}
        if self.evaluation is not None:
            summary["eval"] = self.evaluation
        if self.push:
            summary["push"] = self.push.summary()
        return summary


def plan_job(*, source: str, target: int, revision: str | None = None, factors: str | None = None,
             output: Path | None = None, overwrite: bool = False, copy_weights: bool = False,
             search_data: Sequence[str] = (), search_log: Path | None = None, resume: Path | None = None,
             search_settings: SearchSettings = SearchSettings(), device_map: str | None = None,
             gguf_pattern: str | None = None, eval_lengths: Sequence[int] = (), eval_data: Sequence[str] = (),
             push_to: str | None = None, private: bool = False, branch: str | None = None,
             commit_message: str | None = None, dry_run: bool = False, arguments: Sequence[str] | None = None,
             status: Status = quiet) -> JobPlan:
    """Check and plan the whole job (see the module's docstring), for run_job to carry out or a dry run to show.

    Takes api.convert_checkpoint's arguments (documented there; `gguf_pattern` is its `gguf`), and:
        dry_run: download and write nothing (a Hub source is read remotely; a search's caps, which need the
            tokenizer, are planned for a local source only).
        arguments: the command line that asked for the job, repeated with --resume when a search is interrupted.

    Order: the Hub login (push_to), the evaluation data; then without a search the conversion's plan
    (convert.plan_conversion: output, source, factors, files), with one the source opened once (downloaded unless
    `dry_run`), the output folder and the factor file checked, and the search planned for a dry run.

    Returns:
        JobPlan: `summary()` (JSON data, what `--dry-run --json` prints) and `lines()` (in words).

    Raises:
        LongRoPEError (SourceError, OutputError, TargetError, FactorFileError, DataError, HubError) or the OSError met.

    Example:
        >>> plan = plan_job(source="./SmolLM2-135M", target=16384, search_data=["./books"], dry_run=True)
        >>> plan.search.caps
    """
    if search_data and factors:
        raise LongRoPEError("a search finds the factors: give no factors with search data")
    if bool(eval_lengths) != bool(eval_data):
        raise LongRoPEError("evaluation lengths and evaluation data go together")
    if push_to:
        check_push(push_to)
    if eval_data:
        check_data(eval_data)
    evaluation = EvaluationStep(sorted(set(eval_lengths)), list(eval_data), device_map) if eval_lengths else None
    push = PushStep(push_to, private, branch, commit_message) if push_to else None
    common = dict(source=source, revision=revision, target=target, overwrite=overwrite, copy_weights=copy_weights,
                  factors=factors, gguf_pattern=gguf_pattern, evaluation=evaluation, push=push,
                  arguments=list(arguments) if arguments is not None else None)
    if not search_data:
        conversion = plan_conversion(source, target=target, revision=revision, factors=factors, output=output,
                                     overwrite=overwrite, copy_weights=copy_weights, repo=push_to,
                                     download=not dry_run, status=status)
        return JobPlan(output=conversion.output, model=None, conversion=conversion, **common)
    model = open_source(source, revision, download=not dry_run)
    output = Path(output or default_output(model.name, target))
    factors_file = factors_file_for(output)
    check_conversion_output(model, output, overwrite)
    check_search_outputs(model, factors_file, None)
    step = SearchStep(list(search_data), factors_file, Path(resume or search_log or search_log_for(factors_file)),
                      resume is not None, search_settings, device_map)
    if dry_run and model.folder.is_dir():  # the tokenizer is on this machine: plan the search's documents
        from .search import plan_search

        step.caps = plan_search(source=model, data=step.data, target=target, log_path=step.log, resume=step.resume,
                                **asdict(step.settings)).caps_line
    return JobPlan(output=output, model=model, conversion=None, search=step, **common)


def run_job(plan: JobPlan, *, status: Status = quiet, progress: Progress = no_progress) -> JobResult | None:
    """Carry out a plan: search, convert (GGUF files written into the staging folder, so that the output
    appears complete or not at all), evaluate and refresh the card, push. Returns None on the torchrun
    processes that do not write (a search spread over several). Raises as the steps do; an interrupted search or
    evaluation says first how to continue it."""
    searched = None
    conversion = plan.conversion
    if plan.search is not None:
        step = plan.search
        searched = run_search(plan.model, data=step.data, target=plan.target, out=step.factors_file, log=step.log,
                              resume=step.resume, device_map=step.device_map, arguments=plan.arguments,
                              settings=step.settings, status=status, progress=progress)
        if searched is None:
            return None
        conversion = plan_conversion(plan.model, target=plan.target, factors=str(step.factors_file),
                                     output=plan.output, overwrite=plan.overwrite, copy_weights=plan.copy_weights,
                                     repo=plan.push.repo if plan.push else None, status=status)
    model, factor_set = conversion.source, conversion.factor_set
    status(f"source: {model.folder} ({model.fingerprint.num_hidden_layers} layers, head_dim "
           f"{model.fingerprint.head_dim}, window {model.original_window})")
    status(f"factors: {conversion.factors_origin} (n_hat {factor_set.n_hat}, long mscale {factor_set.long_mscale:.4f})")
    ggufs, gguf_results = [], []
    if plan.gguf_pattern:  # found and checked before anything is written
        from .gguf import extend_gguf, source_ggufs

        ggufs = source_ggufs(plan.source, plan.revision, model.folder, plan.gguf_pattern, factor_set,
                             conversion.factors_origin)

    def write_ggufs(staging: Path) -> None:  # inside the staging folder: in place only when all are written
        for gguf_model in ggufs:
            written = extend_gguf(gguf_model, staging / gguf_model.path.name, factor_set,
                                  factors_origin=conversion.factors_origin, status=status)
            status(f"wrote {gguf_model.path.name} in {written.seconds:.1f} s")
            gguf_results.append(written)

    result = write_planned(conversion, overwrite=plan.overwrite, status=status, extra=write_ggufs if ggufs else None)
    status(f"wrote {result.output} in {result.seconds:.1f} s ({result.weight_mode} weights, "
           f"{result.weight_bytes / 1e9:.2f} GB)")
    evaluation = None
    if plan.evaluation is not None:
        evaluation = evaluate_converted(result.output, plan.evaluation, status=status, progress=progress)
    pushed = None
    if plan.push is not None:
        pushed = push_converted(result.output, plan.push, status=status)
    return JobResult(plan=plan, conversion=result, search=searched, gguf=gguf_results, evaluation=evaluation,
                     push=pushed)


def run_search(model: SourceModel, *, data: list[str], target: int | None, out: Path, log: Path, resume: bool,
               short: bool = False, settings: SearchSettings = SearchSettings(), device_map: str | None = None,
               arguments: Sequence[str] | None = None, status: Status = quiet,
               progress: Progress = no_progress) -> SearchOutcome | None:
    """Run a search (search.SearchRun) and write its factor file `out`; on Ctrl-C or SIGTERM, say how to continue
    it (the command line `arguments` with --resume, else resume=LOG). Returns None on the torchrun processes that
    do not write."""
    from .search import SearchRun

    run = SearchRun(source=model, data=data, target=target, log_path=log, short=short, resume=resume,
                    device_map=device_map, status=status, **asdict(settings))
    best = [math.inf]
    timer = StepTimer(run.progress_work)  # at most: racing and patience may stop it earlier
    with progress("search", timer.total, "document evaluations") as step:
        def evaluated() -> None:
            if run.is_main:
                timer.step()
                step(", ".join(filter(None, [f"best perplexity {best[0]:.4f}" if math.isfinite(best[0]) else "",
                                             timer.time_left()])))

        try:
            factor_set, summary = run.execute(on_evaluation=evaluated, on_best=lambda ppl: best.__setitem__(0, ppl))
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI turns it into SystemExit)
            if run.is_main:
                again = resume_command(arguments, log) if arguments is not None else f"resume='{log}'"
                status(f"search interrupted; every finished evaluation is in {log}. Continue it with:\n  {again}")
            raise
    if not run.is_main:
        return None
    factor_set.save(out)
    status(f"wrote {out}: method {summary['method']}, {OBJECTIVE_LABELS[summary['objective']]} "
           f"{summary['best_perplexity']:.4f} (n_hat "
           f"{summary['n_hat']}) after {summary['evaluations']:g} evaluations; baselines: "
           + (", ".join(f"{k} {v:.4f}" for k, v in summary["baselines"].items()) or "none measured"))
    return SearchOutcome(factors_file=Path(out), log=Path(log), factor_set=factor_set, summary=summary)


def search_and_convert(*, source: str, target: int | None, data: list[str], out: Path | None = None,
                       revision: str | None = None, log: Path | None = None, resume: Path | None = None,
                       short: bool = False, settings: SearchSettings = SearchSettings(),
                       convert_to: Path | None = None, device_map: str | None = None,
                       arguments: Sequence[str] | None = None, status: Status = quiet,
                       progress: Progress = no_progress) -> SearchOutcome | None:
    """What `longrope-convert search` does: open the source once, check where the factor file (default
    ./<source>-<target>.factors.json) and `convert_to` go, search, and convert with the result when asked.
    Returns None on the torchrun processes that do not write."""
    model = open_source(source, revision)
    out = Path(out or default_factors_file(model.name, target))
    check_search_outputs(model, out, convert_to)
    searched = run_search(model, data=data, target=target, out=out, log=Path(resume or log or search_log_for(out)),
                          resume=resume is not None, short=short, settings=settings, device_map=device_map,
                          arguments=arguments, status=status, progress=progress)
    if searched is None:
        return None
    if convert_to is not None:
        searched.checkpoint = write_checkpoint(model, searched.factor_set, convert_to, str(out), status=status)
        status(f"wrote {searched.checkpoint.output}")
    return searched


def evaluate_with_progress(plan, *, out: Path | None, command: str, device_map: str | None, status: Status = quiet,
                           progress: Progress = no_progress) -> dict[str, Any]:
    """evaluate.run_evaluation of an evaluation.EvaluationPlan, reporting each measurement to `progress`."""
    from .evaluate import run_evaluation

    timer = StepTimer(plan.work)
    with progress("eval", timer.total, plan.step_unit) as step:
        def measured() -> None:
            timer.step()
            step(timer.time_left())

        return run_evaluation(plan, out=out, command=command, device_map=device_map, status=status,
                              on_step=measured)


def evaluate_converted(checkpoint: Path, step: EvaluationStep, *, status: Status = quiet,
                       progress: Progress = no_progress) -> dict[str, Any]:
    """The job's evaluation: `eval CHECKPOINT --lengths ... --data ... --baselines --card`, results in
    CHECKPOINT/eval, the card's sections refreshed. Returns the results."""
    from .card import refresh_card
    from .evaluate import plan_evaluation

    command = step.command(checkpoint)
    try:
        plan = plan_evaluation(checkpoint, data=step.data, lengths=step.lengths, baselines=True, out=None,
                               status=status)
        results = evaluate_with_progress(plan, out=None, command=command, device_map=step.device_map,
                                         status=status, progress=progress)
    except (KeyboardInterrupt, SystemExit, LongRoPEError, OSError):
        status(f"{checkpoint} is converted, but its evaluation did not finish (nothing was pushed); finish with:\n"
               f"  {command}")
        raise
    refresh_card(checkpoint)
    status(f"wrote {checkpoint / 'eval'} and {checkpoint / 'README.md'}")
    return results


def push_converted(folder: Path, step: PushStep, *, status: Status = quiet) -> PushResult:
    """Push a converted folder (publish.push_folder) and say what the commit did and how to load it."""
    pushed = push_folder(folder, step.repo, private=step.private, branch=step.branch,
                         commit_message=step.commit_message, status=status)
    if pushed.deleted:
        status(f"deleted from {step.repo} in the same commit (files of an earlier conversion that this folder does "
               f"not have): {', '.join(pushed.deleted)}")
    if pushed.kept:
        status(f"kept in {step.repo} (not conversion outputs): {', '.join(pushed.kept)}")
    status(f"pushed to {pushed.repo_url} ({step.branch or 'main'}) at commit {pushed.commit}"
           + ("" if pushed.changed else " (unchanged: no new commit)"))
    status("load it with:\n" + loading_snippet(step.repo, pushed.commit, folder))
    return pushed
