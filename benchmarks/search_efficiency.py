"""Search efficiency on the tiny testbed at 8x: best perplexity against evaluations, default vs paper preset.

    python benchmarks/search_efficiency.py [--seeds 0 1 2] [--plot benchmarks/search_efficiency.png]

Both presets search the tiny Llama (window 256) for 2048 tokens on the search data (4 chapters of
Tom Sawyer, tests/data), with the same seed. One evaluation = one candidate on all 4 documents;
the default preset's raced-out children count for the documents they were scored on. Goal: the
default reaches the paper preset's final perplexity with at most 1/4 of its evaluations.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from longrope_convert.search import SearchRun
from longrope_convert.source import read_source

ROOT = Path(__file__).resolve().parent.parent
TESTBED = ROOT / "tests" / "testbed" / "tiny-llama-256"
DATA = ROOT / "tests" / "data" / "tom_sawyer_chapters.jsonl"


def search(preset: str, seed: int, work: Path) -> dict:
    run = SearchRun(read_source(TESTBED), [str(DATA)], 2048, documents=4, preset=preset, seed=seed,
                    log_path=work / f"{preset}-{seed}.log.jsonl", baselines=False)
    _, summary = run.execute()
    return summary


def evaluations_to_reach(history: list[tuple[float, float]], perplexity: float) -> float | None:
    return next((evaluations for evaluations, best in history if best <= perplexity), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    rows, curves = [], {}
    for seed in args.seeds:
        paper, default = search("paper", seed, work), search("default", seed, work)
        curves[f"paper, seed {seed}"], curves[f"default, seed {seed}"] = paper["history"], default["history"]
        reached = evaluations_to_reach(default["history"], paper["best_perplexity"])
        rows.append((seed, paper["best_perplexity"], paper["evaluations"], default["best_perplexity"],
                     default["evaluations"], reached))
    print("| seed | paper: final ppl | paper: evaluations | default: final ppl | default: evaluations "
          "| default: evaluations to reach paper's final ppl |\n|---|---|---|---|---|---|")
    for seed, paper_ppl, paper_evals, default_ppl, default_evals, reached in rows:
        ratio = f"{reached:.1f} ({reached / paper_evals:.2f} x)" if reached is not None else "not reached"
        print(f"| {seed} | {paper_ppl:.3f} | {paper_evals:.0f} | {default_ppl:.3f} | {default_evals:.1f} | {ratio} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        for name, history in curves.items():
            axes.step([e for e, _ in history], [b for _, b in history], where="post", label=name)
        axes.set_xscale("log")
        axes.set_xlabel("evaluations (candidate x all documents)")
        axes.set_ylabel("best perplexity so far")
        axes.set_title("tiny testbed, 256 -> 2048 tokens")
        axes.legend()
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
