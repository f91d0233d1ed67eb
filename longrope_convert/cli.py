"""The `longrope-convert` command. Thin: parsing, messages and exit codes; the work lives in the modules."""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .convert import check_conversion_output, default_output, plan_conversion, write_checkpoint, write_planned
from .errors import LongRoPEError
from .evolution import DEFAULT_SPACE  # pure Python: `convert` still never imports torch
from .evolution import PRESETS as SEARCH_PRESETS
from .evolution import SPACES as SEARCH_SPACES
from .factors import ANALYTIC_METHODS, DEFAULT_INIT
from .fetch import open_source
from .preflight import check_push, check_search_outputs
from .progress import Progress
from .publish import loading_snippet, push_folder

DEVICE_MAPS = ["auto"]  # accelerate's placement of a model over the GPUs it may use

EXAMPLES = """\b
Examples:
  longrope-convert meta-llama/Meta-Llama-3-8B --target 65536 --push-to me/Llama-3-8B-LongRoPE-64k
  longrope-convert ./Meta-Llama-3-8B --target 65536
  longrope-convert meta-llama/Meta-Llama-3-8B --target 65536 --dry-run
  longrope-convert ./SmolLM2-135M --target 16384 --factors yarn --output ./smollm2-16k
  longrope-convert ./SmolLM2-135M --target 16384 --factors my_factors.json --json
  longrope-convert ./SmolLM2-135M --target 65536 --search --data ./books --time-budget 36000 \\
      --eval-lengths 16384,65536 --eval-data ./other-books --push-to me/SmolLM2-135M-LongRoPE-64k
"""


def status(message: str) -> None:
    click.echo(message, err=True)


def _integers(ctx, param, value: str | None) -> list[int]:
    try:
        return [int(part) for part in value.split(",")] if value else []
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


class ConvertByDefault(click.Group):
    """`longrope-convert SOURCE ...` means `longrope-convert convert SOURCE ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:  # as click >= 8.2 does for a bare group (no_args_is_help): the help on stderr, exit 2
            click.echo(ctx.get_help(), err=True)
            ctx.exit(2)
        if args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


@click.group(cls=ConvertByDefault, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="longrope-convert")
def cli() -> None:
    """Extend a Llama checkpoint's context window with LongRoPE, without fine-tuning.

    Without a subcommand, the arguments are those of `convert`.
    """


def _given(ctx: click.Context, *names: str) -> list[str]:
    """The options among `names` (parameter names) given on the command line, as flags."""
    return [next(p.opts[0] for p in ctx.command.params if p.name == name) for name in names
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]


def _finite(ctx, param, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):  # FloatRange lets inf and nan through
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def search_options(command):
    """The options of a search, shared by `search` and `convert --search`."""
    options = [
        click.option("--documents", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Documents per evaluation (the first ones at least as long as the evaluation length)."),
        click.option("--preset", type=click.Choice(list(SEARCH_PRESETS)), default="default", show_default=True,
                     help="'paper': the official hyper-parameters; 'default': far fewer evaluations (at most "
                          f"{SEARCH_PRESETS['default'].max_evals:g})."),
        click.option("--space", type=click.Choice(list(SEARCH_SPACES)), default=None,
                     help=f"'full': every factor searched; 'critical': LongRoPE2's space, factors >= the extension "
                          f"from the critical dimension on and a ramp below it. Default: {DEFAULT_SPACE}."),
        click.option("--max-evals", type=click.FloatRange(min=1), default=None, callback=_finite,
                     help="Budget in evaluations (one candidate on all documents; baselines not counted), never "
                          "exceeded; replaces the preset's."),
        click.option("--time-budget", type=click.FloatRange(min=1), default=None, callback=_finite,
                     help="Budget in seconds from the first evaluation (baselines included), checked before every "
                          "document evaluation; the best so far is written."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--n-hat/--no-n-hat", default=True, show_default=True, help="Search n_hat too."),
        click.option("--max-factor", type=float, default=None, help="Upper bound for factors (default 1.25 x scale)."),
        click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
                     help="JSONL log of every evaluation. Default: <factor file>.log.jsonl."),
        click.option("--resume", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
                     help="Continue the search recorded in this log."),
        click.option("--baselines/--no-baselines", default=True, show_default=True,
                     help="Also measure the source's RoPE unchanged and PI, NTK, YaRN, llama3 composed on it, on "
                          "the same data."),
        click.option("--device-map", type=click.Choice(DEVICE_MAPS), default=None,
                     help="Spread the model over the GPUs (of each torchrun process's share of them) with "
                          "accelerate, for models that do not fit one GPU."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


SEARCH_SETTINGS = ("documents", "preset", "space", "max_evals", "time_budget", "seed", "n_hat", "max_factor",
                   "baselines", "device_map")


def run_search(model, *, data: list[str], target: int | None, out: Path, log_path: Path | None,
               resume: Path | None, short: bool = False, **settings) -> tuple:
    """Run a search (search.SearchRun) with a progress bar and write its factor file `out`; on Ctrl-C or
    SIGTERM, say how to resume. Returns (factor set, summary), or None on the torchrun ranks that do not
    write."""
    from .search import SearchRun

    log = resume or log_path or out.with_name(out.name + ".log.jsonl")
    run = SearchRun(source=model, data=data, target=target, log_path=log, short=short, resume=resume is not None,
                    status=status, **settings)
    best = [math.inf]
    progress = Progress(run.progress_work)  # at most: racing and patience may stop it earlier

    def best_so_far() -> str:
        return ", ".join(filter(None, [f"best perplexity {best[0]:.4f}" if math.isfinite(best[0]) else "",
                                       progress.time_left()]))

    with click.progressbar(length=progress.total, label="search (document evaluations)", file=sys.stderr,
                           show_pos=True, show_eta=False, item_show_func=lambda _: best_so_far()) as bar:
        def evaluated() -> None:
            if not run.is_main:
                return
            progress.step()
            bar.update(1)
            if not sys.stderr.isatty():  # no live bar in a log file: a line per finished evaluation
                status(progress.line("search", "document evaluations")
                       + (f", best perplexity {best[0]:.4f}" if math.isfinite(best[0]) else ""))

        try:
            factor_set, summary = run.execute(on_evaluation=evaluated, on_best=lambda ppl: best.__setitem__(0, ppl))
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (main() turns it into SystemExit)
            if run.is_main:
                status(f"search interrupted; every finished evaluation is in {log}. Continue it with:\n"
                       f"  {resume_command(sys.argv[1:], log)}")
            raise
    if not run.is_main:
        return None
    factor_set.save(out)
    status(f"wrote {out}: method {summary['method']}, perplexity {summary['best_perplexity']:.4f} (n_hat "
           f"{summary['n_hat']}) after {summary['evaluations']:g} evaluations; baselines: "
           + (", ".join(f"{k} {v:.4f}" for k, v in summary["baselines"].items()) or "none measured"))
    return factor_set, summary


@cli.command(epilog=EXAMPLES)
@click.argument("source")
@click.option("--target", type=click.IntRange(min=1), required=True, help="New context window in tokens.")
@click.option("--factors", "factors", default=None, metavar="|".join(("FILE", "FOLDER", *ANALYTIC_METHODS)),
              help="Factor file (or a folder converted by longrope-convert: its factor file), or an analytic method. "
                   f"Default: shipped searched factors for this model and target, else the {DEFAULT_INIT} init (with "
                   "a warning).")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SOURCE.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Output folder. Default: ./<source name>-longrope-<target> (16k for 16384).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--copy-weights", is_flag=True, help="Copy weight files instead of hard-linking them.")
@click.option("--push-to", default=None, metavar="REPO", help="Push the output folder to this Hub repo (one commit).")
@click.option("--private", is_flag=True, help="Create the pushed repo as private.")
@click.option("--branch", default=None, help="Push to this branch (created if needed) instead of main.")
@click.option("--commit-message", default=None, help="Commit message of the push.")
@click.option("--dry-run", is_flag=True, help="Say what would be downloaded, written and pushed; do nothing.")
@click.option("--gguf", "gguf_pattern", default=None, metavar="PATTERN",
              help="Also extend SOURCE's GGUF files that match PATTERN (e.g. '*Q4_K_M.gguf') into the output "
                   "folder, for llama.cpp.")
@click.option("--search", "search_first", is_flag=True,
              help="Search the factors on --data first (as the `search` command does, with its options below; the "
                   "factor file and its log are written next to the output folder), then convert with them.")
@click.option("--data", multiple=True,
              help="With --search: text files, folders of .txt/.jsonl, JSONL files, or a `datasets` id. Repeatable.")
@search_options
@click.option("--eval-lengths", callback=_integers, default=None,
              help="After converting: perplexity at these lengths on --eval-data (with the baselines), written to "
                   "OUTPUT/eval and the model card, before any push.")
@click.option("--eval-data", multiple=True, help="Documents for --eval-lengths (other than the search's). Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.pass_context
def convert(ctx: click.Context, source: str, target: int, factors: str | None, revision: str | None,
            output: Path | None, overwrite: bool, copy_weights: bool, push_to: str | None, private: bool,
            branch: str | None, commit_message: str | None, dry_run: bool, gguf_pattern: str | None,
            search_first: bool, data: tuple[str, ...], log_path: Path | None, resume: Path | None,
            eval_lengths: list[int], eval_data: tuple[str, ...], as_json: bool, **search_settings) -> None:
    """Convert SOURCE (a local checkpoint folder or a Hub repo id) into a LongRoPE checkpoint for --target tokens."""
    from .preflight import check_data

    given = _given(ctx, "data", "log_path", "resume", *SEARCH_SETTINGS)
    if given and not search_first:
        raise click.UsageError(f"{given[0]} applies to --search")
    given = _given(ctx, "private", "branch", "commit_message")
    if given and not push_to:
        raise click.UsageError(f"{given[0]} applies to --push-to")
    if search_first and (factors or not data or dry_run):
        raise click.UsageError("--search finds the factors: drop --factors" if factors else
                               "--search needs --data" if not data else "--dry-run does not cover --search")
    if bool(eval_lengths) != bool(eval_data):
        raise click.UsageError("--eval-lengths and --eval-data go together")
    if eval_lengths and not all(2 <= length <= target for length in eval_lengths):  # evaluate.check_lengths's bounds
        raise click.UsageError(f"--eval-lengths must lie between 2 and --target {target} tokens")
    if dry_run and (gguf_pattern or eval_lengths):
        raise click.UsageError(f"--dry-run does not cover {'--gguf' if gguf_pattern else '--eval-lengths'} yet")
    if push_to:
        check_push(push_to)
    if eval_data:
        check_data(eval_data)
    search_summary = None
    if search_first:
        model = open_source(source, revision)
        output = Path(output or default_output(model.name, target))
        factors_file = output.with_name(output.name + ".factors.json")
        check_conversion_output(model, output, overwrite)
        check_search_outputs(model, factors_file, None)
        searched = run_search(model, data=list(data), target=target, out=factors_file, log_path=log_path,
                              resume=resume, **search_settings)
        if searched is None:  # a torchrun rank that does not write
            return
        factors, search_summary = str(factors_file), {"factors": str(factors_file), **searched[1]}
    plan = plan_conversion(source, target=target, revision=revision, factors=factors, output=output,
                           overwrite=overwrite, copy_weights=copy_weights, repo=push_to, download=not dry_run,
                           status=status)
    if dry_run:
        summary = {**plan.summary(), "source": source, "revision": revision}
        summary["push"] = {"repo": push_to, "branch": branch or "main", "private": private, "files": len(plan.files),
                           "bytes": summary["write_bytes"]} if push_to else None
        status(f"dry run: download {len(plan.download)} files ({summary['download_bytes'] / 1e9:.2f} GB); "
               f"write {plan.output} ({len(plan.files)} files, {summary['write_bytes'] / 1e9:.2f} GB); factors "
               f"{plan.factors_origin}" + (f"; push to {push_to} ({branch or 'main'})" if push_to else ""))
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        return
    model, factor_set = plan.source, plan.factor_set
    status(f"source: {model.folder} ({model.fingerprint.num_hidden_layers} layers, head_dim "
           f"{model.fingerprint.head_dim}, window {model.original_window})")
    status(f"factors: {plan.factors_origin} (n_hat {factor_set.n_hat}, long mscale {factor_set.long_mscale:.4f})")
    ggufs, gguf_results = [], []
    if gguf_pattern:  # found and checked before anything is written
        from .gguf import extend_gguf, source_ggufs

        ggufs = source_ggufs(source, revision, model.folder, gguf_pattern, factor_set, plan.factors_origin)

    def write_ggufs(staging: Path) -> None:  # inside the staging folder: in place only when all are written
        for gguf_model in ggufs:
            written = extend_gguf(gguf_model, staging / gguf_model.path.name, factor_set,
                                  factors_origin=plan.factors_origin, status=status)
            status(f"wrote {gguf_model.path.name} in {written.seconds:.1f} s")
            gguf_results.append({**written.summary(), "output": str(plan.output / gguf_model.path.name)})

    result = write_planned(plan, overwrite=overwrite, status=status, extra=write_ggufs if ggufs else None)
    status(f"wrote {result.output} in {result.seconds:.1f} s ({result.weight_mode} weights, "
           f"{result.weight_bytes / 1e9:.2f} GB)")
    summary = result.summary()
    if gguf_results:
        summary["gguf"] = gguf_results
    if search_summary:
        summary["search"] = search_summary
    if eval_lengths:
        summary["eval"] = evaluate_and_refresh_card(result.output, lengths=eval_lengths, data=list(eval_data),
                                                    device_map=search_settings["device_map"])
    if push_to:
        summary["push"] = _push(result.output, push_to, private, branch, commit_message)
    if as_json:
        click.echo(json.dumps(summary, indent=2))


@cli.command(epilog="""\b
Examples:
  longrope-convert search ./SmolLM2-135M --target 16384 --data ./books --out smollm2-16k.json
  longrope-convert search ./SmolLM2-135M --target 16384 --data ./books --max-evals 40 --convert-to ./smollm2-16k
  longrope-convert search ./smollm2-16k --target 32768 --data ./books       (progressive: from a LongRoPE checkpoint)
  longrope-convert search ./smollm2-16k --short --data ./books              (short factors at the original window)
  torchrun --nproc-per-node 8 -m longrope_convert search ./Meta-Llama-3-8B --target 65536 --data pg19
""")
@click.argument("source")
@click.option("--target", type=click.IntRange(min=1), default=None, help="Context window to search factors for.")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SOURCE.")
@click.option("--data", multiple=True, required=True,
              help="Text files, folders of .txt/.jsonl, JSONL files, or a `datasets` id. Repeatable.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Factor file to write. Default: ./<source>-<target>.factors.json.")
@search_options
@click.option("--short", is_flag=True, help="Search the short factors of a LongRoPE checkpoint instead.")
@click.option("--convert-to", type=click.Path(path_type=Path), default=None,
              help="Then write a converted checkpoint with the searched factors here.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def search(source: str, target: int | None, revision: str | None, data: tuple[str, ...], out: Path | None,
           short: bool, log_path: Path | None, resume: Path | None, convert_to: Path | None, as_json: bool,
           **settings) -> None:
    """Search LongRoPE factors for SOURCE by evolution on long-document perplexity."""
    model = open_source(source, revision)
    out = out or Path(f"{Path(model.name).name}-{target or 'short'}.factors.json")
    check_search_outputs(model, out, convert_to)
    searched = run_search(model, data=list(data), target=target, out=out, log_path=log_path, resume=resume,
                          short=short, **settings)
    if searched is None:  # a torchrun rank that does not write
        return
    factor_set, summary = searched
    if convert_to is not None:
        result = write_checkpoint(model, factor_set, convert_to, str(out), status=status)
        status(f"wrote {result.output}")
    if as_json:
        click.echo(json.dumps({"factors": str(out), **summary}, indent=2))


def evaluate_with_progress(plan, *, out: Path | None, command: str, device_map: str | None) -> dict:
    """evaluate.run_evaluation with a progress bar, per document forward and needle prompt with the time left (a
    status line each when stderr is not a terminal)."""
    from .evaluate import run_evaluation

    progress = Progress(plan.work)
    with click.progressbar(length=progress.total, label="eval", file=sys.stderr, show_pos=True, show_eta=False,
                           item_show_func=lambda _: progress.time_left()) as bar:
        def on_step() -> None:
            progress.step()
            bar.update(1)
            if not sys.stderr.isatty():  # no live bar in a log file: a line per document or prompt
                status(progress.line("eval", plan.step_unit))

        return run_evaluation(plan, out=out, command=command, device_map=device_map, status=status, on_step=on_step)


def evaluate_and_refresh_card(checkpoint: Path, *, lengths: list[int], data: list[str],
                              device_map: str | None = None) -> dict:
    """`eval CHECKPOINT --lengths ... --data ... --baselines --card`: perplexity of the checkpoint and the
    baselines, results in CHECKPOINT/eval, the card's sections refreshed. Returns the results."""
    from .card import refresh_card
    from .evaluate import plan_evaluation

    command = f"longrope-convert eval {shlex.quote(str(checkpoint))} --lengths {','.join(map(str, lengths))} " + \
        " ".join(f"--data {shlex.quote(entry)}" for entry in data) + " --baselines --card"
    try:
        plan = plan_evaluation(checkpoint, data=data, lengths=lengths, baselines=True, out=None, status=status)
        results = evaluate_with_progress(plan, out=None, command=command, device_map=device_map)
    except (KeyboardInterrupt, SystemExit, LongRoPEError, OSError):
        status(f"{checkpoint} is converted, but its evaluation did not finish (nothing was pushed); finish with:\n"
               f"  {command}")
        raise
    refresh_card(checkpoint)
    status(f"wrote {checkpoint / 'eval'} and {checkpoint / 'README.md'}")
    return results


def _push(folder: Path, repo: str, private: bool, branch: str | None, commit_message: str | None) -> dict:
    """Push a folder, say what the commit did, and return its summary."""
    pushed = push_folder(folder, repo, private=private, branch=branch, commit_message=commit_message, status=status)
    if pushed.deleted:
        status(f"deleted from {repo} in the same commit (files of an earlier conversion that this folder does not "
               f"have): {', '.join(pushed.deleted)}")
    if pushed.kept:
        status(f"kept in {repo} (not conversion outputs): {', '.join(pushed.kept)}")
    status(f"pushed to {pushed.repo_url} ({branch or 'main'}) at commit {pushed.commit}"
           + ("" if pushed.changed else " (unchanged: no new commit)"))
    status("load it with:\n" + loading_snippet(repo, pushed.commit, folder))
    return {"repo": repo, "url": pushed.repo_url, "commit": pushed.commit, "changed": pushed.changed,
            "deleted": pushed.deleted, "kept": pushed.kept}


def resume_command(arguments: list[str], log: Path) -> str:
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


@cli.command(name="gguf", epilog="""\b
Examples:
  longrope-convert gguf SmolLM2-135M-Instruct.Q4_1.gguf --target 16384      (shipped searched factors)
  longrope-convert gguf Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf --factors yarn --target 262144
  longrope-convert gguf model.Q8_0.gguf --factors ./model-longrope-64k --output model-64k.Q8_0.gguf
""")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--factors", default=None, metavar="|".join(("FILE", "FOLDER", *ANALYTIC_METHODS)),
              help="Factor file, folder converted by longrope-convert, or an analytic method (with --target; "
                   "composed on the GGUF's own RoPE). Default: shipped searched factors for this model and target.")
@click.option("--target", type=click.IntRange(min=1), default=None, help="New context length in tokens.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Output GGUF. Default: ./<source stem>-longrope-<target>.gguf (16k for 16384).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def gguf_command(source: Path, factors: str | None, target: int | None, output: Path | None, overwrite: bool,
                 as_json: bool) -> None:
    """Extend a Llama GGUF for llama.cpp: the long factor set as rope_freqs, the new context length."""
    from .gguf import default_gguf_output, extend_gguf, inspect_gguf, resolve_gguf_factors

    model = inspect_gguf(source)
    status(f"source: {source} ({model.fingerprint.num_hidden_layers} layers, head_dim {model.fingerprint.head_dim}, "
           f"context {model.context_length}" + (", own rope_freqs" if model.base_factors else "") + ")")
    factor_set, origin = resolve_gguf_factors(model, factors, target, status=status)
    result = extend_gguf(model, output or default_gguf_output(source, factor_set.target_length), factor_set,
                         factors_origin=origin, overwrite=overwrite, status=status)
    status(f"wrote {result.output} in {result.seconds:.1f} s (context {factor_set.target_length}, factors {origin}, "
           f"attention factor {factor_set.long_mscale:.4f}, {result.tensors} tensors copied, "
           f"{result.tensor_bytes / 1e9:.2f} GB)")
    if as_json:
        click.echo(json.dumps(result.summary(), indent=2))


def _fractions(ctx, param, value: str) -> list[float]:
    try:
        depths = [float(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not all(0 <= depth <= 1 for depth in depths):
        raise click.BadParameter("depths are fractions of the prompt, between 0 and 1")
    return depths


def _task_names(ctx, param, value: str) -> list[str]:
    from .needles import RULER_TASKS

    return list(RULER_TASKS) if value == "all" else [part.strip() for part in value.split(",") if part.strip()]


@cli.command(name="eval", epilog="""\b
Examples:
  longrope-convert eval ./smollm2-16k --lengths 4096,8192,16384 --data ./books --baselines
  longrope-convert eval ./smollm2-16k --lengths 16384 --data ./books --protocol sliding --stride 256
  longrope-convert eval ./smollm2-16k --needle-lengths 8192,16384 --data ./books --baselines --card
  longrope-convert eval ./smollm2-16k --needle-lengths 16384 --needles niah_single,vt --data ./books --trials 5
  longrope-convert eval ./smollm2-16k --passkey-lengths 8192,16384 --trials 5 --card
  longrope-convert eval ./smollm2-16k --lengths 16384,32768 --data pg19:test --beyond-target
""")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--lengths", callback=_integers, default=None,
              help="Context lengths for perplexity, e.g. 4096,8192 (2 .. the checkpoint's target).")
@click.option("--data", multiple=True,
              help="Text files, folders, JSONL files or a `datasets` id (DATASET[:SPLIT]): the perplexity documents "
                   "and the needle tasks' haystack. Repeatable.")
@click.option("--baselines", is_flag=True,
              help="Also evaluate the search's baselines (the source's RoPE unchanged; PI, NTK, YaRN, llama3 composed "
                   "on it) on the same weights, and the needle tasks for the source at its own window.")
@click.option("--protocol", type=click.Choice(["truncated", "sliding"]), default="truncated", show_default=True)
@click.option("--stride", type=click.IntRange(min=1), default=256, show_default=True,
              help="Stride of the sliding-window protocol (smaller than each length but the largest).")
@click.option("--documents", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--needle-lengths", callback=_integers, default=None,
              help="Lengths for the needle tasks (RULER's, on --data as haystack): prompt and answer fill each exactly.")
@click.option("--needles", callback=_task_names, default="all", show_default=True,
              help="Needle tasks: niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt (comma-separated).")
@click.option("--passkey-lengths", callback=_integers, default=None,
              help="Lengths for passkey retrieval: prompt and answer fill each exactly.")
@click.option("--depths", callback=_fractions, default="0.1,0.5,0.9", show_default=True,
              help="Needle and passkey depths, as fractions of the haystack.")
@click.option("--trials", type=click.IntRange(min=1), default=3, show_default=True,
              help="Needle and passkey prompts per length and depth.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Needle and passkey prompts generated at once.")
@click.option("--no-chat-template", "chat_template", is_flag=True, flag_value=False, default=True,
              help="Needle and passkey prompts as plain text even when the tokenizer has a chat template.")
@click.option("--beyond-target", is_flag=True, help="Allow lengths beyond the checkpoint's target (extrapolation).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for results.json and the plots. Default: CHECKPOINT/eval.")
@click.option("--card", is_flag=True,
              help="Update the evaluation and the other sections longrope-convert wrote in CHECKPOINT/README.md.")
@click.option("--device-map", type=click.Choice(DEVICE_MAPS), default=None,
              help="Spread the model over the GPUs with accelerate, for models that do not fit one GPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of tables.")
@click.pass_context
def evaluate(ctx: click.Context, checkpoint: Path, lengths: list[int], data: tuple[str, ...], baselines: bool,
             protocol: str, stride: int, documents: int, needle_lengths: list[int], needles: list[str],
             passkey_lengths: list[int], depths: list[float], trials: int, seed: int, batch_size: int,
             chat_template: bool, beyond_target: bool, out: Path | None, card: bool, device_map: str | None,
             as_json: bool) -> None:
    """Perplexity against length, needle tasks (RULER's) and passkey retrieval for a converted CHECKPOINT;
    plots and model card."""
    from .card import EVAL_DIR, refresh_card
    from .evaluate import plan_evaluation

    if _given(ctx, "stride") and protocol != "sliding":
        raise click.UsageError("--stride applies to --protocol sliding")
    if _given(ctx, "needles") and not needle_lengths:
        raise click.UsageError("--needles applies to --needle-lengths")
    if card and out is not None and Path(out).resolve() != (checkpoint / EVAL_DIR).resolve():
        raise click.UsageError(f"--card reads the results in {checkpoint / EVAL_DIR}: drop --out")
    plan = plan_evaluation(checkpoint, data=list(data), lengths=lengths, baselines=baselines, protocol=protocol,
                           stride=stride, documents=documents, passkey_lengths=passkey_lengths,
                           needle_lengths=needle_lengths, needles=needles, depths=depths, trials=trials, seed=seed,
                           batch_size=batch_size, chat_template=chat_template, beyond_target=beyond_target, out=out,
                           status=status)
    results = evaluate_with_progress(plan, out=out, command="longrope-convert eval " + " ".join(sys.argv[2:]),
                                     device_map=device_map)
    if card:
        refresh_card(checkpoint)
        status(f"wrote {checkpoint / 'README.md'}")
    elif out is None and "<!-- longrope-convert:begin evaluation" in _card_text(checkpoint):
        status(f"warning: {checkpoint / 'README.md'} still shows the earlier evaluation, not these results in "
               f"{checkpoint / EVAL_DIR}; run again with --card to update it")
    click.echo(json.dumps(results, indent=2, allow_nan=False) if as_json else "\n".join(_result_tables(results)))


def _card_text(folder: Path) -> str:
    try:
        return (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _result_tables(results: dict) -> list[str]:
    from .card import needle_table, needle_verdict, perplexity_table

    results = json.loads(json.dumps(results))  # lengths as strings, as in results.json
    lines = []
    if "perplexity" in results:
        lines += perplexity_table(results["perplexity"]["perplexity"], corner="perplexity")
    if "needles" in results:
        for task, measured in results["needles"]["tasks"].items():
            lines += needle_table({task: measured}, corner=task)
        lines += needle_verdict(results["needles"])
    return lines


@cli.command(epilog="""\b
Examples:
  longrope-convert push ./smollm2-16k --to me/SmolLM2-135M-LongRoPE-16k
  longrope-convert eval ./smollm2-16k --lengths 8192,16384 --data ./books --card && \\
    longrope-convert push ./smollm2-16k --to me/SmolLM2-135M-LongRoPE-16k --branch eval
""")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--to", "repo", required=True, metavar="REPO", help="Hub repo to push to (created if needed).")
@click.option("--branch", default=None, help="Push to this branch (created if needed) instead of main.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--commit-message", default=None, help="Commit message of the push.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def push(folder: Path, repo: str, branch: str | None, private: bool, commit_message: str | None,
         as_json: bool) -> None:
    """Publish a converted checkpoint FOLDER to the Hub as one commit that mirrors it.

    The card's loading snippet is set to REPO and --branch; files of an earlier conversion that FOLDER
    does not have are deleted in the same commit; other files in the repo are kept.
    """
    check_push(repo)
    summary = _push(folder, repo, private, branch, commit_message)
    if as_json:
        click.echo(json.dumps(summary, indent=2))


OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another place",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another place",
    errno.EFBIG: "the file is too large for this file system or for the process's file size limit",
    errno.EROFS: "read-only file system: choose a writable place",
    errno.EACCES: "permission denied: choose a place you may write to",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter one",
    errno.EBUSY: "in use by another process or a mount point",
}


def os_error_message(error: OSError) -> str:
    """One line for an error of the operating system: the path(s) and what happened."""
    paths = " -> ".join(f"'{name}'" for name in (error.filename, error.filename2) if name is not None)
    reason = OS_ERROR_HINTS.get(error.errno) or error.strerror or next(
        (line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return f"{paths}: {reason}" if paths else reason


def main() -> None:
    # SIGTERM and SIGHUP unwind like Ctrl-C, so staging folders are removed; after SIGKILL the next run
    # removes them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        code = cli.main(standalone_mode=False)
    except click.UsageError as error:
        status(f"error: {error.format_message()} (see 'longrope-convert --help')")
        sys.exit(2)
    except click.ClickException as error:
        status(f"error: {error.format_message()}")
        sys.exit(error.exit_code)
    except click.Abort:
        status("aborted")
        sys.exit(130)
    except LongRoPEError as error:
        status(f"error: {error}")
        sys.exit(1)
    except OSError as error:
        status(f"error: {os_error_message(error)}")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
