"""Search efficiency on the tiny testbed at 8x: best perplexity against evaluations, default vs paper preset.

    python benchmarks/search_efficiency.py [--seeds 0 1 2] [--plot benchmarks/search_efficiency.png]
                                           [--reuse LOG ...]

Both presets search the tiny Llama (window 256) for 2048 tokens on the search data (4 chapters of
Tom Sawyer, tests/data): the paper preset once (seed 0, 1344 evaluations), the default preset with
each seed given (its hyper-parameters were tuned with seed 0, so other seeds are the fair check).
One evaluation = one candidate on all 4 documents; the default preset's raced-out children count
for the documents they were scored on. Goal: the default reaches the paper preset's final
perplexity with at most 1/4 of its evaluations.

--reuse takes evaluations from earlier search logs of the same model and data instead of computing
them again. An evaluation is a pure function of candidate and document (bit-identical across runs
on the same machine and thread count, checked on 1257 of them), so the results are the same; only
the time changes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from longrope_convert.search import SearchRun
from longrope_convert.search_log import logged_evaluations
from longrope_convert.source import read_source

ROOT = Path(__file__).resolve().parent.parent
TESTBED = ROOT / "tests" / "testbed" / "tiny-llama-256"
DATA = ROOT / "tests" / "data" / "tom_sawyer_chapters.jsonl"


def search(preset: str, seed: int, work: Path, known: dict) -> dict:
    run = SearchRun(read_source(TESTBED), [str(DATA)], 2048, documents=4, preset=preset, seed=seed,
                    log_path=work / f"{preset}-{seed}.log.jsonl", baselines=False)
    run.log.known.update(known)
    _, summary = run.execute()
    known.update(run.log.known)
    return summary


def evaluations_to_reach(history: list[tuple[float, float]], perplexity: float) -> float | None:
    return next((evaluations for evaluations, best in history if best <= perplexity), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--reuse", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    known = {}
    for log in args.reuse:
        known.update(logged_evaluations(log.read_text().splitlines()[1:]))
    work = Path(tempfile.mkdtemp())
    paper = search("paper", 0, work, known)
    curves = {"paper, seed 0": paper["history"]}
    print(f"paper preset, seed 0: final perplexity {paper['best_perplexity']:.3f} after "
          f"{paper['evaluations']:.0f} evaluations\n")
    print("| default preset, seed | final ppl | evaluations | evaluations to reach the paper's final ppl |\n"
          "|---|---|---|---|")
    for seed in args.seeds:
        default = search("default", seed, work, known)
        curves[f"default, seed {seed}"] = default["history"]
        reached = evaluations_to_reach(default["history"], paper["best_perplexity"])
        ratio = f"{reached:.1f} ({reached / paper['evaluations']:.2f} x)" if reached is not None else "not reached"
        print(f"| {seed} | {default['best_perplexity']:.3f} | {default['evaluations']:.1f} | {ratio} |", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        for name, history in curves.items():
            axes.step([e for e, _ in history], [b for _, b in history], where="post", label=name)
        axes.set_xscale("log")
        finals = [history[-1][1] for history in curves.values()]
        axes.set_ylim(min(finals) * 0.98, max(finals) * 1.12)  # the first candidates (PI: ~190) off the top
        axes.set_xlabel("evaluations (candidate x all documents)")
        axes.set_ylabel("best perplexity so far")
        axes.set_title("tiny testbed, 256 -> 2048 tokens")
        axes.legend()
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
