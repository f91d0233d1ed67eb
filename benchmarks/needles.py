"""The needle tasks on SmolLM2-135M-Instruct: the source at its own window (8k) and the checkpoint converted to
16k with the shipped searched factors, against YaRN on the same weights and the same prompts.

`eval --needle-lengths 16384 --baselines` measures every baseline (none, PI, NTK, YaRN, llama3); on two CPU
cores that is hours per task, so this script runs eval's own plan with the checkpoint's set, YaRN and the
source only, one task at a time (each task's results.json is kept as soon as it is done, so a stopped run
keeps what it measured), and prints the Markdown table of BENCHMARKS.md.

    python benchmarks/needles.py --data ../shared/corpus/prose/doyle_sherlock_adventures.txt \
        --depths 0.25,0.75 --trials 1 --out /tmp/needles-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from longrope_convert.card import SOURCE, needle_table, needle_verdict
from longrope_convert.evaluate import plan_evaluation, run_evaluation
from longrope_convert.needles import RULER_TASKS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from model_cache import smollm2_folder  # noqa: E402

KEPT = ("yarn", SOURCE)  # besides the checkpoint's own set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--tasks", default=",".join(RULER_TASKS))
    parser.add_argument("--depths", default="0.25,0.75")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--target", type=int, default=16384)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    checkpoint = args.out / "SmolLM2-135M-Instruct-longrope-16k"
    if not checkpoint.is_dir():  # the shipped searched factors are the default for this model and target
        subprocess.run([sys.executable, "-m", "longrope_convert", str(smollm2_folder()), "--target",
                        str(args.target), "--output", str(checkpoint)], check=True)
    tasks = {}
    for task in args.tasks.split(","):
        out = args.out / task
        if not (out / "results.json").is_file():
            plan = plan_evaluation(checkpoint, data=args.data, lengths=[], baselines=True,
                                   needle_lengths=[args.target], needles=[task],
                                   depths=[float(d) for d in args.depths.split(",")], trials=args.trials,
                                   batch_size=args.batch_size, status=print)
            label = next(iter(plan.sets))
            plan.sets = {name: s for name, s in plan.sets.items() if name == label or name in KEPT}
            plan.needle_sets = {name: s for name, s in plan.needle_sets.items() if name == label or name in KEPT}
            plan.needle_lengths = {name: by_task for name, by_task in plan.needle_lengths.items() if name in plan.needle_sets}
            start = time.monotonic()
            run_evaluation(plan, out=out, command=" ".join(sys.argv), status=print)
            print(f"{task}: {time.monotonic() - start:.0f} s", flush=True)
        tasks[task] = json.loads((out / "results.json").read_text())
    needles = next(iter(tasks.values()))["needles"]
    merged = {**needles, "tasks": {task: results["needles"]["tasks"][task] for task, results in tasks.items()}}
    for task, measured in merged["tasks"].items():
        print("\n".join(needle_table({task: measured}, corner=task)) + "\n")
    print("\n".join(needle_table(merged["tasks"], corner="mean")))
    print("\n" + " ".join(needle_verdict(merged)))


if __name__ == "__main__":
    main()
