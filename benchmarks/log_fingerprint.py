"""What the search log's fingerprint costs: SHA-256 of the weight files, streamed, and peak memory.

    python benchmarks/log_fingerprint.py [FILE ...] [--repeats 3]

Default: SmolLM2-135M's model.safetensors (538 MB). Each file is read once before (warm page
cache: the search loads the same files right after, so a cold read is paid once either way); the
median of the repeats. Peak RSS of the process shows that memory does not grow with the file.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

from longrope_convert.search_log import file_sha256
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from model_cache import smollm2_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, nargs="*")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    files = args.files or [smollm2_folder() / "model.safetensors"]
    print("| file | GB | seconds | GB/s |\n|---|---|---|---|")
    for path in files:
        file_sha256(path)  # warm the page cache
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            file_sha256(path)
            seconds.append(time.perf_counter() - started)
        size = path.stat().st_size / 1e9
        median = statistics.median(seconds)
        print(f"| {path.name} | {size:.2f} | {median:.2f} | {size / median:.2f} |", flush=True)
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
