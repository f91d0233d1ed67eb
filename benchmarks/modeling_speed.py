"""Remote-code LongRoPE model vs stock LlamaForCausalLM on SmolLM2-135M: prefill, decode, window crossing.

    python benchmarks/modeling_speed.py [--threads 2]

Both models are fp32 with SDPA attention. Every measurement alternates the two models, so drift
on a shared machine hits both alike. Prefill: one forward of 2048 and 8192 tokens (inside the
original window, where both compute the same thing), logits for the last token only; median of
alternating runs. Decode: 64 single-token cached steps after a 512-token prompt, the two models
stepping in turn; median step. Crossing: cached steps around the 8192-token window, the two models
stepping in turn; at the step that crosses it, the LongRoPE model rebuilds the cache of the
8192-token prefix with the long factors (stock transformers does not, and is wrong from there on).
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaForCausalLM

from longrope_convert.convert import write_checkpoint
from longrope_convert.factors import analytic_factor_set
from longrope_convert.perplexity import document_ids
from longrope_convert.source import read_source
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from model_cache import smollm2_folder  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sherlock_holmes_excerpt.txt"


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


@torch.inference_mode()
def prefill_seconds(model, ids, repeats):
    return [timed(lambda: model(ids, logits_to_keep=1, use_cache=False)) for _ in range(repeats)]


@torch.inference_mode()
def cached_step_seconds(models: dict, ids, prompt_length, steps) -> dict[str, list[float]]:
    """Seconds of each single-token cached step after a prompt, the models stepping in turn."""
    caches = {name: DynamicCache(config=model.config) for name, model in models.items()}
    for name, model in models.items():
        model(ids[:, :prompt_length], cache=caches[name], use_cache=True, logits_to_keep=1)
    seconds = {name: [] for name in models}
    for end in range(prompt_length + 1, prompt_length + steps + 1):
        for name, model in models.items():
            seconds[name].append(timed(lambda: model(ids[:, end - 1 : end], cache=caches[name], use_cache=True)))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source_dir = smollm2_folder()
    work = Path(tempfile.mkdtemp())
    source = read_source(source_dir)
    write_checkpoint(source, analytic_factor_set("yarn", source.fingerprint, 16384), work / "out", "init:yarn")
    models = {
        "stock LlamaForCausalLM": LlamaForCausalLM.from_pretrained(source_dir, dtype=torch.float32),
        "LongRoPE remote code": AutoModelForCausalLM.from_pretrained(work / "out", trust_remote_code=True,
                                                                     dtype=torch.float32),
    }
    ids = document_ids(AutoTokenizer.from_pretrained(source_dir), TEXT.read_text(), 8196)

    print("| measure | stock | LongRoPE | stock / LongRoPE time |\n|---|---|---|---|")
    for length, repeats in ((2048, 5), (8192, 3)):
        runs = {name: [] for name in models}
        for _ in range(repeats):  # alternate, so drift hits both alike
            for name, model in models.items():
                runs[name] += prefill_seconds(model, ids[:, :length], 1)
        stock, ours = (statistics.median(runs[name]) for name in models)
        print(f"| prefill {length} tokens (s) | {stock:.2f} | {ours:.2f} | {stock / ours:.3f} |", flush=True)

    decode = cached_step_seconds(models, ids, 512, 64)
    stock, ours = (statistics.median(decode[name]) for name in models)
    print(f"| decode after 512 tokens (tokens/s) | {1 / stock:.1f} | {1 / ours:.1f} | {stock / ours:.3f} |")

    print("\n| cached step: sequence length after the step | stock (s) | LongRoPE (s) |\n|---|---|---|")
    crossing = cached_step_seconds(models, ids, 8190, 4)
    for i, length in enumerate(range(8191, 8195)):
        note = " (crosses the window: LongRoPE rebuilds the cache)" if length == 8193 else ""
        print(f"| {length}{note} | {crossing['stock LlamaForCausalLM'][i]:.3f} | "
              f"{crossing['LongRoPE remote code'][i]:.3f} |")
    print(f"\ntorch {torch.__version__}, {args.threads} threads", file=sys.stderr)


if __name__ == "__main__":
    main()
