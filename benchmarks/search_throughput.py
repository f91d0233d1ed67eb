"""Search throughput on the tiny testbed: evaluations per hour, and the share of time spent in the fitness.

    python benchmarks/search_throughput.py [--target 2048] [--documents 4] [--max-evals 60] [--threads 2]

The default preset searches the tiny Llama (tests/testbed, window 256) for `--target` tokens on the
search data (chapters of Tom Sawyer, tests/data), with the baselines, in this process (no CLI
start-up). One evaluation = one candidate on all documents; a raced-out child counts for the
documents it was scored on. The fitness share is the time logged for the document evaluations over
the wall time of the run: what is left is the search's own overhead (evolution, log, factor swaps).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from longrope_convert.search import SearchRun
from longrope_convert.source import read_source

ROOT = Path(__file__).resolve().parent.parent
TESTBED = ROOT / "tests" / "testbed" / "tiny-llama-256"
DATA = ROOT / "tests" / "data" / "tom_sawyer_chapters.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=int, default=2048)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--max-evals", type=float, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = Path(tempfile.mkdtemp()) / "search.log.jsonl"
    run = SearchRun(source=read_source(TESTBED), data=[str(DATA)], target=args.target, documents=args.documents,
                    max_evals=args.max_evals, log_path=log)
    started = time.perf_counter()
    _, summary = run.execute()
    wall = time.perf_counter() - started
    entries = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    fitness_seconds = sum(entry["seconds"] for entry in entries)
    searched = summary["evaluations"]
    total = len(entries) / args.documents  # candidates and baselines
    print("| target | documents | evaluations (search + baselines) | wall s | evaluations / hour "
          "| document evaluations / s | fitness share of wall time |\n|---|---|---|---|---|---|---|")
    print(f"| {args.target} | {args.documents} | {searched:.1f} + {total - searched:.1f} | {wall:.1f} | "
          f"{total / wall * 3600:.0f} | {len(entries) / wall:.2f} | {fitness_seconds / wall:.3f} |")
    print(f"torch {torch.__version__}, {args.threads} threads", file=sys.stderr)


if __name__ == "__main__":
    main()
