"""The public Python API: `from longrope_convert import convert_checkpoint, search_factors, ...`.

Keyword-only functions over the library's modules, each returning a result object; what the command line does,
without the command line. Messages reach the caller through one callback, `status` (silent by default); the search
and the evaluation report progress through a `Progress` (job.Progress). Failures raise errors.LongRoPEError
subclasses (one line each) or the OSError met. Importing this module imports no torch: only the search and the
evaluation load it, when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card import EVAL_DIR, needle_table, needle_verdict, perplexity_table, refresh_card
from .convert import ConversionResult
from .errors import LongRoPEError
from .evolution import DEFAULT_OBJECTIVE, DEFAULT_SPACE, OBJECTIVES, PRESETS, SPACES
from .factors import ANALYTIC_METHODS, DEFAULT_INIT, FactorSet
from .job import (
    JobPlan,
    JobResult,
    Progress,
    PushStep,
    SearchOutcome,
    SearchSettings,
    Status,
    evaluate_with_progress,
    no_progress,
    plan_job,
    push_converted,
    quiet,
    run_job,
    search_and_convert,
)
from .needles import OBJECTIVE_TASK, RULER_TASKS
from .preflight import check_push
from .publish import PushResult, check_converted

if TYPE_CHECKING:
    from .gguf import GGUFResult

# The package's top level names the same (longrope_convert.API) and loads this module on first use of one.
__all__ = [
    "convert_checkpoint", "plan_job", "run_job", "search_factors", "evaluate_checkpoint", "push_checkpoint",
    "export_gguf", "evaluation_tables",
    "JobPlan", "JobResult", "ConversionResult", "SearchSettings", "SearchOutcome", "EvaluationResult", "PushResult",
    "FactorSet", "Progress", "Status", "no_progress", "quiet",
    "ANALYTIC_METHODS", "DEFAULT_INIT", "DEFAULT_SPACE", "SEARCH_PRESETS", "SEARCH_SPACES", "RULER_TASKS",
    "DEFAULT_OBJECTIVE", "SEARCH_OBJECTIVES", "DEFAULT_NEEDLE_TASK",
    "EVAL_DIR", "LongRoPEError",
]

SEARCH_PRESETS = PRESETS  # {name: evolution.Preset}: "default" (few evaluations) and "paper" (LongRoPE's settings)
SEARCH_SPACES = SPACES  # "full", "critical"
SEARCH_OBJECTIVES = OBJECTIVES  # "ppl" (perplexity of the documents), "needle" (of needle items' answer tokens), ...
DEFAULT_NEEDLE_TASK = OBJECTIVE_TASK  # the needle objective's items: RULER's multi-query (one of RULER_TASKS)


def convert_checkpoint(*, source: str | Path, target: int, factors: str | Path | None = None,
                       revision: str | None = None, output: str | Path | None = None, overwrite: bool = False,
                       copy_weights: bool = False, search_data: Sequence[str | Path] = (),
                       search_settings: SearchSettings = SearchSettings(), search_log: str | Path | None = None,
                       resume: str | Path | None = None, gguf: str | None = None, eval_lengths: Sequence[int] = (),
                       eval_data: Sequence[str | Path] = (), device_map: str | None = None,
                       push_to: str | None = None, private: bool = False, branch: str | None = None,
                       commit_message: str | None = None, status: Status = quiet,
                       progress: Progress = no_progress) -> JobResult | None:
    """Convert a Llama checkpoint into a LongRoPE checkpoint for `target` tokens: the whole job of
    `longrope-convert SOURCE --target N`, planned (plan_job: every check first) and then carried out (run_job).

    Args:
        source: a checkpoint folder (safetensors) or a Hub repo id.
        target: the new context window, in tokens (larger than the source's).
        factors: a factor file, a folder converted by longrope-convert, or an analytic method (ANALYTIC_METHODS);
            None: the shipped searched factors for this model and target, else DEFAULT_INIT (with a warning).
        revision: branch, tag or commit of a Hub source.
        output: the folder to write; None: ./<source name>-longrope-<target> (16k for 16384).
        overwrite: replace an existing output folder (only one that holds nothing but this tool's outputs).
        copy_weights: copy the weight files instead of hard-linking them.
        search_data: search the factors on these documents first (text files, folders of .txt/.jsonl, JSONL
            files, a `datasets` id); the factor file <output>.factors.json and its log are written next to the
            output folder. Excludes `factors`.
        search_settings: how the search runs (SearchSettings: documents, preset, budgets in evaluations and
            seconds, seed, ...).
        search_log: the search's JSONL log; None: <factor file>.log.jsonl. resume: continue the search of this log.
        gguf: also extend the source's GGUF files matching this pattern (e.g. "*Q4_K_M.gguf") into the output.
        eval_lengths, eval_data: after converting, perplexity at these lengths (tokens) on these documents, for the
            checkpoint and the baselines; written to OUTPUT/eval and the model card, before any push.
        device_map: "auto" spreads the model of the search and evaluation over the GPUs (accelerate).
        push_to, private, branch, commit_message: push the output folder to this Hub repo, as one commit.
        status: called with each message line. progress: the display of the search's and evaluation's steps.

    Returns:
        JobResult: `output` (the folder), `factor_set` (factors, n_hat, attention scales, provenance),
        `conversion` (weights linked or copied, bytes, seconds), and `search`, `gguf`, `evaluation` (results.json
        as written), `push` (commit) for the steps asked for; None on the torchrun processes that do not write.

    Raises:
        SourceError (a source that cannot be converted), OutputError (an output that would harm files),
        FactorFileError (factors for another model or target), DataError, HubError, LongRoPEError, OSError.

    Example:
        >>> result = convert_checkpoint(source="./SmolLM2-135M", target=16384, factors="yarn",
        ...                             output="./smollm2-16k", status=print)
        >>> result.factor_set.n_hat, result.output
    """
    plan = plan_job(source=str(source), target=target, revision=revision,
                    factors=None if factors is None else str(factors), output=_path(output), overwrite=overwrite,
                    copy_weights=copy_weights, search_data=_entries(search_data),
                    search_log=_path(search_log), resume=_path(resume), search_settings=search_settings,
                    device_map=device_map, gguf_pattern=gguf, eval_lengths=list(eval_lengths),
                    eval_data=_entries(eval_data), push_to=push_to, private=private, branch=branch,
                    commit_message=commit_message, status=status)
    return run_job(plan, status=status, progress=progress)


def search_factors(*, source: str | Path, data: Sequence[str | Path], target: int | None = None,
                   out: str | Path | None = None, revision: str | None = None, log: str | Path | None = None,
                   resume: str | Path | None = None, short: bool = False,
                   settings: SearchSettings = SearchSettings(), convert_to: str | Path | None = None,
                   device_map: str | None = None, arguments: Sequence[str] | None = None,
                   status: Status = quiet, progress: Progress = no_progress) -> SearchOutcome | None:
    """Search LongRoPE factors for `source` by evolution on long-document perplexity (`longrope-convert search`).

    Args:
        source: a checkpoint folder or a Hub repo id; a LongRoPE checkpoint for a progressive search.
        data: the search documents (text files, folders of .txt/.jsonl, JSONL files, a `datasets` id).
        target: the context window to search factors for, in tokens (None only with `short`).
        out: the factor file to write; None: ./<source name>-<target>.factors.json.
        log: the JSONL log of every evaluation; None: <out>.log.jsonl. resume: continue the search of this log.
        short: search the short factors of a LongRoPE checkpoint (at its original window) instead.
        settings: documents, preset, budgets (evaluations, seconds), seed, ... (SearchSettings).
        convert_to: then write a converted checkpoint with the searched factors into this new folder.
        device_map: "auto" spreads the model over the GPUs (accelerate).
        arguments: the command line that asked for this search; an interrupted search says to run it again with
            --resume LOG (without it: resume=LOG).
        status, progress: messages and the display of the document evaluations.

    Returns:
        SearchOutcome: `factors_file`, `log`, `factor_set` (its provenance: data, evaluations, best and
        baseline perplexities, budget), `summary` (method, best_perplexity, baselines, evaluations, seconds),
        `checkpoint` (the conversion, with `convert_to`); None on the torchrun processes that do not write.

    Raises:
        LongRoPEError for settings that cannot be searched or no document of the evaluation length, DataError,
        OutputError, SourceError, OSError.

    Example:
        >>> found = search_factors(source="./SmolLM2-135M", target=16384, data=["./books"],
        ...                        settings=SearchSettings(max_evals=40), status=print)
        >>> found.summary["best_perplexity"], found.factors_file
    """
    return search_and_convert(source=str(source), target=target, data=_entries(data),
                              out=_path(out), revision=revision, log=_path(log), resume=_path(resume), short=short,
                              settings=settings, convert_to=_path(convert_to), device_map=device_map,
                              arguments=arguments, status=status, progress=progress)


@dataclass
class EvaluationResult:
    """An evaluation's results (results.json as written: lengths as int keys, perplexities per method and length,
    needle accuracies per task, method, length and depth), the folder they were written to, and the card
    rewritten with them (None when not asked for)."""

    results: dict[str, Any]
    folder: Path
    card: Path | None = None


def evaluate_checkpoint(*, checkpoint: str | Path, lengths: Sequence[int] = (), data: Sequence[str | Path] = (),
                        baselines: bool = False, protocol: str = "truncated", stride: int = 256,
                        documents: int = 4, needle_lengths: Sequence[int] = (),
                        needles: Sequence[str] = RULER_TASKS, passkey_lengths: Sequence[int] = (),
                        depths: Sequence[float] = (0.1, 0.5, 0.9), trials: int = 3, seed: int = 0,
                        batch_size: int = 4, chat_template: bool = True, beyond_target: bool = False,
                        out: str | Path | None = None, card: bool = False, device_map: str | None = None,
                        command: str = "", status: Status = quiet,
                        progress: Progress = no_progress) -> EvaluationResult:
    """Measure a converted checkpoint (`longrope-convert eval`): perplexity against length, RULER's needle tasks,
    passkey retrieval; results.json and plots in `out`.

    Args:
        checkpoint: a folder written by longrope-convert.
        lengths: perplexity at these lengths (tokens; 2 .. the checkpoint's target) on `data`'s documents.
        data: text files, folders, JSONL files or a `datasets` id: the documents and the needle tasks' haystack.
        baselines: also measure the source's RoPE unchanged and the analytic sets on the same weights.
        protocol: "truncated" (each document's first L tokens) or "sliding" (windows every `stride` tokens).
        documents: how many documents of at least max(lengths) tokens to score.
        needle_lengths, needles: lengths (tokens) and tasks of RULER's needle tests; passkey_lengths: the passkey's.
        depths (fractions of the haystack), trials, seed, batch_size, chat_template: how the needle prompts are made.
        beyond_target: allow lengths beyond the checkpoint's target (extrapolation).
        out: the results folder; None: CHECKPOINT/eval (replaced when all is measured).
        card: rewrite CHECKPOINT/README.md's sections with the results (only with the default `out`).
        device_map: "auto" spreads the model over the GPUs. command: recorded in the results' settings.
        status, progress: messages and the display of the measurements.

    Returns:
        EvaluationResult: `results` (as in results.json), `folder`, `card`.

    Raises:
        EvaluationError (a length out of bounds, nothing to evaluate), DataError, SourceError (no LongRoPE
        checkpoint, no tokenizer), OutputError, LongRoPEError, OSError.

    Example:
        >>> measured = evaluate_checkpoint(checkpoint="./smollm2-16k", lengths=[4096, 16384], data=["./books"],
        ...                                baselines=True)
        >>> measured.results["perplexity"]["perplexity"]["none"][16384]
    """
    from .evaluate import plan_evaluation

    checkpoint = Path(checkpoint)
    if card and out is not None and Path(out).resolve() != (checkpoint / EVAL_DIR).resolve():
        raise LongRoPEError(f"the card reads the results in {checkpoint / EVAL_DIR}: write them there to update it")
    plan = plan_evaluation(checkpoint, data=_entries(data), lengths=list(lengths),
                           baselines=baselines, protocol=protocol, stride=stride, documents=documents,
                           passkey_lengths=list(passkey_lengths), needle_lengths=list(needle_lengths),
                           needles=list(needles), depths=list(depths), trials=trials, seed=seed,
                           batch_size=batch_size, chat_template=chat_template, beyond_target=beyond_target,
                           out=_path(out), status=status)
    results = evaluate_with_progress(plan, out=_path(out), command=command, device_map=device_map, status=status,
                                     progress=progress)
    folder = Path(out) if out is not None else checkpoint / EVAL_DIR
    if card:
        refresh_card(checkpoint)
        status(f"wrote {checkpoint / 'README.md'}")
    elif out is None and "<!-- longrope-convert:begin evaluation" in _card_text(checkpoint):
        status(f"warning: {checkpoint / 'README.md'} still shows the earlier evaluation, not these results in "
               f"{folder}; run again with --card to update it")
    return EvaluationResult(results=results, folder=folder, card=checkpoint / "README.md" if card else None)


def push_checkpoint(*, folder: str | Path, repo: str, private: bool = False, branch: str | None = None,
                    commit_message: str | None = None, status: Status = quiet) -> PushResult:
    """Publish a converted checkpoint folder to the Hub as one commit that mirrors it (`longrope-convert push`).

    The card's loading snippet is set to `repo` and `branch` (default main, created if needed); files of an earlier
    conversion that the folder does not have are deleted in the same commit; other files in the repo are kept.
    The token comes from HF_TOKEN or the saved login.

    Returns:
        PushResult: `repo_url`, `commit` (its id), `changed` (False: the folder was there already, no commit),
        `deleted` and `kept` (file names).

    Raises:
        LongRoPEError for an invalid repo id, no login, or a folder not written by longrope-convert; HubError for
        the Hub's refusals.

    Example:
        >>> pushed = push_checkpoint(folder="./smollm2-16k", repo="me/SmolLM2-135M-LongRoPE-16k")
        >>> pushed.commit
    """
    check_converted(Path(folder))  # the folder first: a wrong folder says so before any login or network
    check_push(repo)
    return push_converted(Path(folder), PushStep(repo, private, branch, commit_message), status=status)


def export_gguf(*, source: str | Path, target: int | None = None, factors: str | Path | None = None,
                output: str | Path | None = None, overwrite: bool = False, status: Status = quiet) -> GGUFResult:
    """Extend a Llama GGUF file for llama.cpp (`longrope-convert gguf`): the long factor set as rope_freqs, the new
    context length; tensors copied byte for byte.

    Args:
        source: the GGUF file.
        target: the new context length in tokens (needed with an analytic method, or for the shipped factors).
        factors: a factor file, a folder converted by longrope-convert, or an analytic method (composed on the
            GGUF's own RoPE); None: the shipped searched factors for this model and target, else DEFAULT_INIT.
        output: the GGUF file to write; None: ./<source stem>-longrope-<target>.gguf.
        overwrite: replace an existing output file.

    Returns:
        GGUFResult: `output`, `factor_set`, `factors_origin`, `tensors` and `tensor_bytes` copied, `seconds`.

    Raises:
        GGUFError (a file that cannot be extended, factors that do not fit it), OutputError, OSError.

    Example:
        >>> written = export_gguf(source="SmolLM2-135M-Instruct.Q4_1.gguf", target=16384, factors="yarn")
        >>> written.output
    """
    from .gguf import default_gguf_output, extend_gguf, inspect_gguf, resolve_gguf_factors

    source = Path(source)
    model = inspect_gguf(source)
    status(f"source: {source} ({model.fingerprint.num_hidden_layers} layers, head_dim {model.fingerprint.head_dim}, "
           f"context {model.context_length}" + (", own rope_freqs" if model.base_factors else "") + ")")
    factor_set, origin = resolve_gguf_factors(model, None if factors is None else str(factors), target,
                                              status=status)
    result = extend_gguf(model, _path(output) or default_gguf_output(source, factor_set.target_length), factor_set,
                         factors_origin=origin, overwrite=overwrite, status=status)
    status(f"wrote {result.output} in {result.seconds:.1f} s (context {factor_set.target_length}, factors {origin}, "
           f"attention factor {factor_set.long_mscale:.4f}, {result.tensors} tensors copied, "
           f"{result.tensor_bytes / 1e9:.2f} GB)")
    return result


def evaluation_tables(results: dict[str, Any]) -> list[str]:
    """An evaluation's results as Markdown tables, the lines the card shows: perplexity by method and length,
    then each needle task's accuracy and the verdict."""
    import json

    results = json.loads(json.dumps(results))  # lengths as strings, as in results.json
    lines = []
    if "perplexity" in results:
        lines += perplexity_table(results["perplexity"]["perplexity"], corner="perplexity")
    if "needles" in results:
        for task, measured in results["needles"]["tasks"].items():
            lines += needle_table({task: measured}, corner=task)
        lines += needle_verdict(results["needles"])
    return lines


def _card_text(folder: Path) -> str:
    try:
        return (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _entries(data: str | Path | Sequence[str | Path]) -> list[str]:
    """A list of --data entries; one path or id given alone is one entry (not its characters)."""
    return [str(data)] if isinstance(data, (str, Path)) else [str(entry) for entry in data]
