"""Peak memory of a perplexity evaluation at 16k tokens on SmolLM2-135M: full logits vs chunked.

    python benchmarks/perplexity_memory.py [--length 16384] [--repeats 1]

Each way runs in its own process under /usr/bin/time (peak RSS), fp32 on the CPU, on the converted
16k checkpoint with the YaRN init:
  naive    model(ids, labels=ids).loss: logits for every position (length x vocab floats), then the loss
  chunked  longrope_convert.perplexity.token_nll: the backbone once, LM head and loss 256 positions at a time
Each repeat runs both ways in turn; seconds are medians, peak RSS the largest seen.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from longrope_convert.convert import write_checkpoint
from longrope_convert.factors import analytic_factor_set
from longrope_convert.source import read_source
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from model_cache import smollm2_folder  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sherlock_holmes_excerpt.txt"
RUN = """
import math, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from longrope_convert.perplexity import document_ids, perplexity, token_nll
folder, way, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
ids = document_ids(AutoTokenizer.from_pretrained(folder), open(sys.argv[4]).read(), length)
started = time.perf_counter()
with torch.inference_mode():
    ppl = math.exp(model(ids, labels=ids).loss.item()) if way == "naive" else perplexity(token_nll(model, ids)[0])
print(f"{ppl:.4f} {time.perf_counter() - started:.1f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    source = read_source(smollm2_folder())
    folder = Path(tempfile.mkdtemp()) / "smollm2-16k"
    write_checkpoint(source, analytic_factor_set("yarn", source.fingerprint, 16384), folder, "init:yarn")
    runs = {"naive": [], "chunked": []}
    for _ in range(args.repeats):  # the two ways in turn: drift on a shared machine hits both alike
        for way, measured in runs.items():
            done = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", RUN, str(folder), way,
                                   str(args.length), str(TEXT)], capture_output=True, text=True, check=True)
            ppl, seconds = done.stdout.split()
            measured.append((ppl, float(seconds), int(done.stderr.strip().splitlines()[-1]) / 1024**2))
            print(way, measured[-1], file=sys.stderr, flush=True)
    print(f"| way | perplexity at {args.length} | seconds | peak RSS (GB) |\n|---|---|---|---|")
    for way, measured in runs.items():
        print(f"| {way} | {measured[0][0]} | {statistics.median(s for _, s, _ in measured):.1f} | "
              f"{max(peak for _, _, peak in measured):.2f} |")


if __name__ == "__main__":
    main()
