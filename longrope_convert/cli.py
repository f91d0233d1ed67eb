"""The `longrope-convert` command. Thin: parsing, messages and exit codes; the work lives in the modules."""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .convert import default_output, plan_conversion, resolve_factors, write_checkpoint
from .errors import LongRoPEError
from .hub import loading_snippet, push_folder
from .source import open_source

# search.PRESETS, named here so that `convert` never imports torch (its memory stays flat)
SEARCH_PRESETS = ("default", "paper")

EXAMPLES = """\b
Examples:
  longrope-convert meta-llama/Meta-Llama-3-8B --target 65536 --push-to me/Llama-3-8B-LongRoPE-64k
  longrope-convert ./Meta-Llama-3-8B --target 65536
  longrope-convert meta-llama/Meta-Llama-3-8B --target 65536 --dry-run
  longrope-convert ./SmolLM2-135M --target 16384 --factors yarn --output ./smollm2-16k
  longrope-convert ./SmolLM2-135M --target 16384 --factors my_factors.json --json
"""


def status(message: str) -> None:
    click.echo(message, err=True)


class ConvertByDefault(click.Group):
    """`longrope-convert SOURCE ...` means `longrope-convert convert SOURCE ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


@click.group(cls=ConvertByDefault, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="longrope-convert")
def cli() -> None:
    """Extend a Llama checkpoint's context window with LongRoPE, without fine-tuning.

    Without a subcommand, the arguments are those of `convert`.
    """


@cli.command(epilog=EXAMPLES)
@click.argument("source")
@click.option("--target", type=click.IntRange(min=1), required=True, help="New context window in tokens.")
@click.option("--factors", "factors", default=None, metavar="FILE|pi|ntk|yarn|llama3",
              help="Factor file, or an analytic method. Default: shipped searched factors for this model and "
                   "target, else the YaRN-derived init (with a warning).")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SOURCE.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Output folder. Default: ./<source name>-longrope-<target>.")
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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def convert(source: str, target: int, factors: str | None, revision: str | None, output: Path | None,
            overwrite: bool, copy_weights: bool, push_to: str | None, private: bool, branch: str | None,
            commit_message: str | None, dry_run: bool, gguf_pattern: str | None, as_json: bool) -> None:
    """Convert SOURCE (a local checkpoint folder or a Hub repo id) into a LongRoPE checkpoint for --target tokens."""
    if dry_run and gguf_pattern:
        raise click.UsageError("--dry-run does not cover --gguf yet")
    if dry_run:
        plan = plan_conversion(source, revision, target, factors, output, overwrite, copy_weights, push_to, branch,
                               private, warn=status)
        status(f"dry run: download {len(plan['download'])} files ({plan['download_bytes'] / 1e9:.2f} GB); "
               f"write {plan['output']} ({len(plan['write'])} files, {plan['write_bytes'] / 1e9:.2f} GB); factors "
               f"{plan['factors']['origin']}" + (f"; push to {push_to} ({plan['push']['branch']})" if push_to else ""))
        if as_json:
            click.echo(json.dumps(plan, indent=2))
        return
    model = open_source(source, revision)
    status(f"source: {model.folder} ({model.fingerprint.num_hidden_layers} layers, head_dim "
           f"{model.fingerprint.head_dim}, window {model.original_window})")
    factor_set, origin = resolve_factors(model, target, factors, warn=status)
    status(f"factors: {origin} (n_hat {factor_set.n_hat}, long mscale {factor_set.long_mscale:.4f})")
    ggufs = []
    if gguf_pattern:  # found and checked before anything is written
        from .gguf import extend_gguf, source_ggufs

        ggufs = source_ggufs(source, revision, model.folder, gguf_pattern, factor_set, origin)
    result = write_checkpoint(model, factor_set, output or default_output(model.name, target), origin,
                              overwrite=overwrite, copy_weights=copy_weights, repo=push_to, log=status)
    status(f"wrote {result.output} in {result.seconds:.1f} s ({result.weight_mode} weights, "
           f"{result.weight_bytes / 1e9:.2f} GB)")
    summary = result.summary()
    for gguf_model in ggufs:
        written = extend_gguf(gguf_model, result.output / gguf_model.path.name, factor_set, factors_origin=origin,
                              warn=status)
        status(f"wrote {written.output} in {written.seconds:.1f} s")
        summary.setdefault("gguf", []).append(written.summary())
    if push_to:
        pushed = push_folder(result.output, push_to, private=private, branch=branch, commit_message=commit_message)
        status(f"pushed to {pushed.repo_url} at commit {pushed.commit}"
               + ("" if pushed.changed else " (unchanged: no new commit)"))
        status("load it with:\n" + loading_snippet(push_to, pushed.commit))
        summary["push"] = {"repo": push_to, "url": pushed.repo_url, "commit": pushed.commit, "changed": pushed.changed}
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
@click.option("--documents", type=click.IntRange(min=1), default=4, show_default=True,
              help="Documents per evaluation (the first ones at least as long as the evaluation length).")
@click.option("--preset", type=click.Choice(SEARCH_PRESETS), default="default", show_default=True,
              help="'paper': the official hyper-parameters; 'default': far fewer evaluations.")
@click.option("--max-evals", type=click.FloatRange(min=1), default=None,
              help="Budget in evaluations (one candidate on all documents).")
@click.option("--time-budget", type=click.FloatRange(min=1), default=None, help="Budget in seconds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-hat/--no-n-hat", default=True, show_default=True, help="Search n_hat too.")
@click.option("--short", is_flag=True, help="Search the short factors of a LongRoPE checkpoint instead.")
@click.option("--max-factor", type=float, default=None, help="Upper bound for factors (default 1.25 x scale).")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="JSONL log of every evaluation. Default: <out>.log.jsonl.")
@click.option("--resume", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Continue the search recorded in this log.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also measure no scaling, PI, NTK, YaRN and llama3 on the same data.")
@click.option("--convert-to", type=click.Path(path_type=Path), default=None,
              help="Then write a converted checkpoint with the searched factors here.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def search(source: str, target: int | None, revision: str | None, data: tuple[str, ...], out: Path | None, documents: int, preset: str,
           max_evals: float | None, time_budget: float | None, seed: int, n_hat: bool, short: bool,
           max_factor: float | None, log_path: Path | None, resume: Path | None, baselines: bool,
           convert_to: Path | None, as_json: bool) -> None:
    """Search LongRoPE factors for SOURCE by evolution on long-document perplexity."""
    from .search import SearchRun

    model = open_source(source, revision)
    out = out or Path(f"{Path(model.name).name}-{target or 'short'}.factors.json")
    run = SearchRun(model, list(data), target, documents=documents, preset=preset, max_evals=max_evals,
                    time_budget=time_budget, seed=seed, n_hat=n_hat, short=short, max_factor=max_factor,
                    log_path=resume or log_path or out.with_name(out.name + ".log.jsonl"), resume=resume is not None,
                    baselines=baselines, status=status)
    best = [math.inf]

    def improved(ppl: float) -> None:
        best[0] = ppl
        if run.is_main and not sys.stderr.isatty():  # no live bar in a log file: a line per improvement
            status(f"search: best perplexity {ppl:.4f}")

    with click.progressbar(length=run.planned_document_evaluations, label="search (document evaluations)",
                           file=sys.stderr, show_pos=True,
                           item_show_func=lambda _: f"best ppl {best[0]:.4f}" if math.isfinite(best[0]) else "",
                           show_eta=True) as bar:
        factor_set, summary = run.execute(on_document=lambda: bar.update(1) if run.is_main else None,
                                          on_best=improved)
    if not run.is_main:
        return
    factor_set.save(out)
    status(f"best perplexity {summary['best_perplexity']:.4f} after {summary['evaluations']:.1f} evaluations "
           f"(n_hat {summary['n_hat']}); baselines: "
           + ", ".join(f"{k} {v:.4f}" for k, v in summary["baselines"].items()) + f"; wrote {out}")
    if convert_to is not None:
        result = write_checkpoint(model, factor_set, convert_to, str(out), log=status)
        status(f"wrote {result.output}")
    if as_json:
        click.echo(json.dumps({"factors": str(out), **summary}, indent=2))


@cli.command(name="gguf", epilog="""\b
Examples:
  longrope-convert gguf SmolLM2-135M-Instruct.Q4_1.gguf --target 16384      (shipped searched factors)
  longrope-convert gguf Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf --factors yarn --target 262144
  longrope-convert gguf model.Q8_0.gguf --factors ./model-longrope-64k --output model-64k.Q8_0.gguf
""")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--factors", default=None, metavar="FILE|FOLDER|pi|ntk|yarn|llama3",
              help="Factor file, folder converted by longrope-convert, or an analytic method (with --target; "
                   "composed on the GGUF's own RoPE). Default: shipped searched factors for this model and target.")
@click.option("--target", type=click.IntRange(min=1), default=None, help="New context length in tokens.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Output GGUF. Default: ./<source stem>-longrope-<target>.gguf.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def gguf_command(source: Path, factors: str | None, target: int | None, output: Path | None, overwrite: bool,
                 as_json: bool) -> None:
    """Extend a Llama GGUF for llama.cpp: the long factor set as rope_freqs, the new context length."""
    from .gguf import default_gguf_output, extend_gguf, inspect_gguf, resolve_gguf_factors

    model = inspect_gguf(source)
    status(f"source: {source} ({model.fingerprint.num_hidden_layers} layers, head_dim {model.fingerprint.head_dim}, "
           f"context {model.context_length}" + (", own rope_freqs" if model.base_factors else "") + ")")
    factor_set, origin = resolve_gguf_factors(model, factors, target, warn=status)
    result = extend_gguf(model, output or default_gguf_output(source, factor_set.target_length), factor_set,
                         factors_origin=origin, overwrite=overwrite, warn=status)
    status(f"wrote {result.output} in {result.seconds:.1f} s (context {factor_set.target_length}, factors {origin}, "
           f"attention factor {factor_set.long_mscale:.4f}, {result.tensors} tensors copied, "
           f"{result.tensor_bytes / 1e9:.2f} GB)")
    if as_json:
        click.echo(json.dumps(result.summary(), indent=2))


def _integers(ctx, param, value: str | None) -> list[int]:
    try:
        return [int(part) for part in value.split(",")] if value else []
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _fractions(ctx, param, value: str) -> list[float]:
    try:
        depths = [float(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not all(0 <= depth <= 1 for depth in depths):
        raise click.BadParameter("depths are fractions of the prompt, between 0 and 1")
    return depths


@cli.command(name="eval", epilog="""\b
Examples:
  longrope-convert eval ./smollm2-16k --lengths 4096,8192,16384 --data ./books --baselines
  longrope-convert eval ./smollm2-16k --lengths 16384 --data ./books --protocol sliding --stride 256
  longrope-convert eval ./smollm2-16k --passkey-lengths 8192,16384 --trials 5 --card
""")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--lengths", callback=_integers, default=None, help="Context lengths for perplexity, e.g. 4096,8192.")
@click.option("--data", multiple=True, help="Text files, folders, JSONL files or a `datasets` id. Repeatable.")
@click.option("--baselines", is_flag=True, help="Also evaluate no scaling, PI, NTK and YaRN on the same weights.")
@click.option("--protocol", type=click.Choice(["truncated", "sliding"]), default="truncated", show_default=True)
@click.option("--stride", type=click.IntRange(min=1), default=256, show_default=True,
              help="Stride of the sliding-window protocol.")
@click.option("--documents", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--passkey-lengths", callback=_integers, default=None, help="Lengths for passkey retrieval.")
@click.option("--depths", callback=_fractions, default="0.1,0.5,0.9", show_default=True,
              help="Passkey depths, as fractions of the prompt.")
@click.option("--trials", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for results.json and the plots. Default: CHECKPOINT/eval.")
@click.option("--card", is_flag=True, help="Rewrite CHECKPOINT/README.md with the results.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of tables.")
def evaluate(checkpoint: Path, lengths: list[int], data: tuple[str, ...], baselines: bool, protocol: str, stride: int,
             documents: int, passkey_lengths: list[int], depths: list[float], trials: int, seed: int, out: Path | None,
             card: bool, as_json: bool) -> None:
    """Perplexity against length and passkey retrieval for a converted CHECKPOINT; plots and model card."""
    from .card import refresh_card
    from .evaluate import BASELINE_METHODS, evaluate_checkpoint

    if data and not lengths:
        raise click.UsageError("--data needs --lengths")
    methods = 1 + (len(BASELINE_METHODS) if baselines else 0)
    steps = methods * ((len(lengths) if data else 0) + len(passkey_lengths) * len(depths) * trials)
    with click.progressbar(length=steps, label="eval", file=sys.stderr, show_eta=True) as bar:
        def on_step() -> None:
            bar.update(1)
            if not sys.stderr.isatty():  # no live bar in a log file: a line per measurement
                status(f"eval: {bar.pos}/{steps} measurements done")

        results = evaluate_checkpoint(checkpoint, list(data), lengths, baselines, protocol, stride, documents,
                                      passkey_lengths, depths, trials, seed, out,
                                      command="longrope-convert eval " + " ".join(sys.argv[2:]), status=status,
                                      on_step=on_step)
    if card:
        refresh_card(checkpoint)
        status(f"wrote {checkpoint / 'README.md'}")
    click.echo(json.dumps(results, indent=2) if as_json else "\n".join(_result_tables(results)))


def _result_tables(results: dict) -> list[str]:
    from .card import passkey_table, perplexity_table

    results = json.loads(json.dumps(results))  # lengths as strings, as in results.json
    lines = []
    if "perplexity" in results:
        lines += perplexity_table(results["perplexity"]["perplexity"], corner="perplexity")
    if "passkey" in results:
        lines += passkey_table(results["passkey"]["accuracy"], corner="passkey")
    return lines


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so temporary folders are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
    sys.exit(code if isinstance(code, int) else 0)
