"""Perplexity in llama.cpp of SmolLM2-135M-Instruct Q4_1 extended to 16k, by context size (`-c`) and input length.

    python benchmarks/llama_cpp_context.py --document ../shared/corpus/prose/doyle_sherlock_adventures.txt \
        [--ggufs source,export,by-context]

Three GGUFs: `source` (no scaling), `export` (what `longrope-convert gguf` writes: the shipped searched long set as
`rope_freqs`, applied whatever `-c`) and `by-context` (the export rewritten as llama.cpp's `longrope` type,
`rope_factors_long` and `rope_factors_short`, which llama.cpp picks by the allocated context: the long set when `-c`
exceeds the original window of 8,192; tests/llama_cpp_runtime.py, by_context_gguf). Each runs on the document's first 8,192 tokens (BOS first)
with `-c 8192`, and on its first 16,384 with `-c 16384`, whose first 8,192 positions give the short input at
`-c 16384` (attention is causal: the same NLL as an 8,192-token run in that context). llama.cpp runs through
llama-cpp-python as the tests do (tests/llama_cpp_runtime.py). Each measurement is printed to stderr as it ends
(minutes each at 16k on 2 cores); then a Markdown table of perplexities on stdout.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llama_cpp_runtime import by_context_gguf, llama_cpp_forward  # noqa: E402
from model_cache import smollm2_folder, smollm2_gguf  # noqa: E402

from longrope_convert import gguf as gguf_export  # noqa: E402
from longrope_convert.factors import load_factor_set  # noqa: E402
from longrope_convert.perplexity import document_ids  # noqa: E402

WINDOW, TARGET = 8192, 16384
FACTORS = Path(__file__).resolve().parent.parent / "factors" / "SmolLM2-135M-Instruct" / f"{TARGET}.json"
GGUFS = {"source": "source GGUF (no scaling)", "export": "`longrope-convert gguf` (long set as rope_freqs)",
         "by-context": "both sets as llama.cpp's `longrope` type (not written by the tool)"}


def perplexity(nll: np.ndarray) -> float:
    return math.exp(float(nll.mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--document", type=Path, required=True, help="held-out text (not the factors' search text)")
    parser.add_argument("--ggufs", default=",".join(GGUFS), help=f"comma-separated, of {', '.join(GGUFS)}")
    args = parser.parse_args()
    ids = document_ids(AutoTokenizer.from_pretrained(smollm2_folder()), args.document.read_text(), TARGET)[0].tolist()
    source = gguf_export.inspect_gguf(smollm2_gguf())
    factor_set = load_factor_set(FACTORS)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.ggufs.split(","):
            path = source.path
            if name != "source":
                path = Path(work) / "export.gguf"
                gguf_export.extend_gguf(source, path, factor_set, factors_origin="shipped", overwrite=True)
            if name == "by-context":
                by_context_gguf(path, factor_set.long_factor, factor_set.short_factor, Path(work) / "by-context.gguf")
                path = Path(work) / "by-context.gguf"
            short, _ = llama_cpp_forward(path, ids[:WINDOW], n_ctx=WINDOW)
            print(f"{name}: {WINDOW} tokens, -c {WINDOW}: {perplexity(short):.3f}", file=sys.stderr, flush=True)
            long, _ = llama_cpp_forward(path, ids, n_ctx=TARGET)
            print(f"{name}: -c {TARGET}: first {WINDOW} tokens {perplexity(long[:WINDOW - 1]):.3f}, {TARGET} tokens "
                  f"{perplexity(long):.3f}", file=sys.stderr, flush=True)
            rows.append((GGUFS[name], perplexity(short), perplexity(long[:WINDOW - 1]), perplexity(long)))
    print(f"{args.document.name}, first {TARGET:,} tokens; perplexity (lower is better)\n")
    print("| GGUF | 8,192 tokens, `-c 8192` | first 8,192 tokens, `-c 16384` | 16,384 tokens, `-c 16384` |")
    print("|---|---|---|---|")
    for name, *values in rows:
        print(f"| {name} | " + " | ".join(f"{value:.3f}" for value in values) + " |")


if __name__ == "__main__":
    main()
