"""The `longrope-convert` command. Thin: parsing, messages and exit codes; the work lives in the modules."""

from __future__ import annotations

import errno
import json
import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .api import (
    ANALYTIC_METHODS,
    DEFAULT_INIT,
    DEFAULT_NEEDLE_TASK,
    DEFAULT_OBJECTIVE,
    DEFAULT_SPACE,
    EVAL_DIR,
    RULER_TASKS,
    SEARCH_OBJECTIVES,
    SEARCH_PRESETS,
    SEARCH_SPACES,
    SearchSettings,
    evaluate_checkpoint,
    evaluation_tables,
    export_gguf,
    plan_job,
    push_checkpoint,
    run_job,
    search_factors,
)
from .errors import SETTINGS, LongRoPEError

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


@contextmanager
def progress_bar(what: str, total: int, unit: str) -> Iterator:
    """The library's Progress on the terminal: a bar on stderr with the library's note (best perplexity, time
    left), or, in a log file (no live bar), a status line per step."""
    note = [""]
    with click.progressbar(length=total, label=f"{what} ({unit})", file=sys.stderr, show_pos=True,
                           item_show_func=lambda _: note[0], show_eta=False) as bar:
        def step(text: str) -> None:
            note[0] = text
            bar.update(1)
            if not sys.stderr.isatty():
                status(f"{what}: {bar.pos}/{bar.length} {unit} done" + (f", {text}" if text else ""))

        yield step


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
        click.option("--objective", type=click.Choice(list(SEARCH_OBJECTIVES)), default=DEFAULT_OBJECTIVE,
                     show_default=True,
                     help="'ppl': perplexity of the documents; 'needle': perplexity of the answer tokens only of "
                          "needle items built on them (LongRoPE2); 'ppl+needle': perplexity, its 4 fittest ranked "
                          "on the needle items."),
        click.option("--needle-task", type=click.Choice(list(RULER_TASKS)), default=DEFAULT_NEEDLE_TASK,
                     show_default=True, help="The needle items' task (RULER's) for --objective needle|ppl+needle."),
        click.option("--max-evals", type=click.FloatRange(min=1), default=None, callback=_finite,
                     help="Budget in evaluations (one candidate on all documents; baselines not counted), never "
                          "exceeded; replaces the preset's."),
        click.option("--time-budget", type=click.FloatRange(min=1), default=None, callback=_finite,
                     help="Budget in seconds from the first evaluation (baselines included), checked before every "
                          "document evaluation; the best so far is written."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--n-hat/--no-n-hat", default=None,
                     help="Search n_hat too. Default: the preset's (paper: yes; default: no, which measured lower held-out "
                          "perplexity on both testbeds)."),
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


SEARCH_SETTINGS = ("documents", "preset", "space", "objective", "needle_task", "max_evals", "time_budget", "seed",
                   "n_hat", "max_factor", "baselines", "device_map")


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
@click.option("--dry-run", is_flag=True,
              help="Say what would be downloaded, searched (the search's caps), written, evaluated and pushed; do "
                   "nothing.")
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
    given = _given(ctx, "data", "log_path", "resume", *SEARCH_SETTINGS)
    if given and not search_first:
        raise click.UsageError(f"{given[0]} applies to --search")
    given = _given(ctx, "private", "branch", "commit_message")
    if given and not push_to:
        raise click.UsageError(f"{given[0]} applies to --push-to")
    if search_first and (factors or not data):
        raise click.UsageError("--search finds the factors: drop --factors" if factors else "--search needs --data")
    if bool(eval_lengths) != bool(eval_data):
        raise click.UsageError("--eval-lengths and --eval-data go together")
    if eval_lengths and not all(2 <= length <= target for length in eval_lengths):  # evaluate.check_lengths's bounds
        raise click.UsageError(f"--eval-lengths must lie between 2 and --target {target} tokens")
    device_map = search_settings.pop("device_map")
    plan = plan_job(source=source, target=target, revision=revision, factors=factors, output=output,
                    overwrite=overwrite, copy_weights=copy_weights, search_data=list(data) if search_first else [],
                    search_log=log_path, resume=resume, search_settings=SearchSettings(**search_settings),
                    device_map=device_map, gguf_pattern=gguf_pattern, eval_lengths=eval_lengths,
                    eval_data=list(eval_data), push_to=push_to, private=private, branch=branch,
                    commit_message=commit_message, dry_run=dry_run, arguments=sys.argv[1:], status=status)
    if dry_run:
        for line in plan.lines():
            status(line)
        if as_json:
            click.echo(json.dumps(plan.summary(), indent=2))
        return
    result = run_job(plan, status=status, progress=progress_bar)
    if result is not None and as_json:  # None: a torchrun process that does not write
        click.echo(json.dumps(result.summary(), indent=2))


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
    device_map = settings.pop("device_map")
    searched = search_factors(source=source, data=list(data), target=target, out=out, revision=revision,
                              log=log_path, resume=resume, short=short, settings=SearchSettings(**settings),
                              convert_to=convert_to, device_map=device_map, arguments=sys.argv[1:], status=status,
                              progress=progress_bar)
    if searched is not None and as_json:  # None: a torchrun process that does not write
        click.echo(json.dumps({"factors": str(searched.factors_file), **searched.summary}, indent=2))


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
    result = export_gguf(source=source, target=target, factors=factors, output=output, overwrite=overwrite,
                         status=status)
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
    if _given(ctx, "stride") and protocol != "sliding":
        raise click.UsageError("--stride applies to --protocol sliding")
    if _given(ctx, "needles") and not needle_lengths:
        raise click.UsageError("--needles applies to --needle-lengths")
    if card and out is not None and Path(out).resolve() != (checkpoint / EVAL_DIR).resolve():
        raise click.UsageError(f"--card reads the results in {checkpoint / EVAL_DIR}: drop --out")
    measured = evaluate_checkpoint(checkpoint=checkpoint, lengths=lengths, data=list(data), baselines=baselines,
                                   protocol=protocol, stride=stride, documents=documents,
                                   passkey_lengths=passkey_lengths, needle_lengths=needle_lengths, needles=needles,
                                   depths=depths, trials=trials, seed=seed, batch_size=batch_size,
                                   chat_template=chat_template, beyond_target=beyond_target, out=out, card=card,
                                   device_map=device_map, command="longrope-convert eval " + " ".join(sys.argv[2:]),
                                   status=status, progress=progress_bar)
    click.echo(json.dumps(measured.results, indent=2, allow_nan=False) if as_json
               else "\n".join(evaluation_tables(measured.results)))


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
    pushed = push_checkpoint(folder=folder, repo=repo, private=private, branch=branch, commit_message=commit_message,
                             status=status)
    if as_json:
        click.echo(json.dumps(pushed.summary(), indent=2))


# The library's errors name the settings they concern as the Python API does; the command line says its flags.
FLAGS = {setting: "--" + setting.replace("_", "-") for setting in SETTINGS}

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
        status(f"error: {error.worded(FLAGS)}")
        sys.exit(1)
    except OSError as error:
        status(f"error: {os_error_message(error)}")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
