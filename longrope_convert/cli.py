"""The `longrope-convert` command. Thin: parsing, messages and exit codes; the work lives in the modules."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .convert import resolve_factors, write_checkpoint
from .errors import LongRoPEError
from .source import read_source

EXAMPLES = """\b
Examples:
  longrope-convert ./Meta-Llama-3-8B --target 65536
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
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Output folder. Default: ./<source name>-longrope-<target>.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--copy-weights", is_flag=True, help="Copy weight files instead of hard-linking them.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def convert(source: str, target: int, factors: str | None, output: Path | None, overwrite: bool,
            copy_weights: bool, as_json: bool) -> None:
    """Convert SOURCE (a local checkpoint folder) into a LongRoPE checkpoint for --target tokens."""
    model = read_source(source)
    status(f"source: {model.folder} ({model.fingerprint.num_hidden_layers} layers, head_dim "
           f"{model.fingerprint.head_dim}, window {model.original_window})")
    factor_set, origin = resolve_factors(model, target, factors, warn=status)
    status(f"factors: {origin} (method {factor_set.method}, n_hat {factor_set.n_hat}, long mscale "
           f"{factor_set.long_mscale:.4f})")
    output = output or Path(f"{model.folder.resolve().name}-longrope-{_short_length(target)}")
    result = write_checkpoint(model, factor_set, output, origin, overwrite=overwrite,
                              copy_weights=copy_weights, log=status)
    status(f"wrote {result.output} in {result.seconds:.1f} s ({result.weight_mode} weights, "
           f"{result.weight_bytes / 1e9:.2f} GB)")
    if as_json:
        click.echo(json.dumps(result.summary(), indent=2))


def _short_length(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


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
