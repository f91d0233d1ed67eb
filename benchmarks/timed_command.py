"""Wall time and peak memory of a command, as GNU time reports them (shared by the benchmarks)."""

from __future__ import annotations

import subprocess


def time_command(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run of `command` under /usr/bin/time. Raises RuntimeError when
    the command fails."""
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{done.stderr}")
    wall, peak_kb = done.stderr.strip().splitlines()[-1].split()
    return float(wall), int(peak_kb) / 1024
