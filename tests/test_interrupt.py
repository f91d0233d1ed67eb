"""A conversion killed with SIGKILL at any point leaves the output absent or complete, never partial,
and the next run cleans up after it.

The converter runs unmodified under strace, which holds it at a real point (a system call: the weight
copy, the write of config.json, a rename) with `inject=...:delay_enter`; the test watches the output's
folder until the staging folder shows that point and the converter is held there, then kills it. The
kill takes effect when strace lets the held call go on: the call is then skipped. The converter's
process id is read from its staging folder's name, as the next run reads it.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longrope_convert.outputs import MARKER

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"
HOLD_US = 2_000_000  # long enough for the test to see the point and kill the converter there

# point: (system calls held, which calls ("1": the first, "1+": all), microseconds, extra arguments,
# when the staging folder shows the point)
POINTS = {
    "copying the weights": ("sendfile,copy_file_range", "1", HOLD_US, ["--copy-weights"],
                            lambda staging: (staging / "model.safetensors").exists()),
    # every write waits half a second (status lines first): config.json is seen while its write waits
    "writing config.json": ("write", "1+", 300_000, [], lambda staging: (staging / "config.json").exists()),
    "before the rename": ("rename,renameat,renameat2", "1", HOLD_US, [], lambda staging: (staging / MARKER).exists()),
}


def hold(calls: str, when: str, microseconds: int) -> list[str]:
    return ["strace", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null", "-e", f"trace={calls}",
            "-e", f"inject={calls}:delay_enter={microseconds}:when={when}"]


def strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-qq", "-o", "/dev/null", "-e", "trace=none", "true"]).returncode == 0


pytestmark = pytest.mark.skipif(not strace_works(), reason="needs strace with ptrace permitted")


def convert(*args, strace: list[str] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [*strace, sys.executable, "-m", "longrope_convert", *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when_held(pid: int, strace: subprocess.Popen) -> None:
    """SIGKILL the converter once it is stopped at the held system call."""
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "t":  # tracing stop
        assert time.monotonic() < deadline and strace.poll() is None, strace.communicate(timeout=5)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    strace.wait(timeout=60)


def staging_folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("point", POINTS)
def test_a_killed_conversion_leaves_no_output_and_the_next_run_cleans_up(point, tmp_path):
    source = tmp_path / "tiny"
    shutil.copytree(TESTBED, source)
    output = tmp_path / "out"
    calls, when, microseconds, extra, reached = POINTS[point]
    args = [source, "--target", 1024, "--factors", "yarn", "--output", output, *extra]
    held = convert(*args, strace=hold(calls, when, microseconds))
    deadline = time.monotonic() + 60
    while True:
        staging = next((p for p in staging_folders(tmp_path) if reached(p)), None)
        if staging is not None or held.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    assert staging is not None, f"the converter never reached '{point}': {held.communicate(timeout=5)}"
    kill_when_held(int(re.search(r"\.partial-(\d+)-", staging.name).group(1)), held)
    assert not output.exists() and staging_folders(tmp_path) == [staging]  # killed: staging left, no output

    rerun = convert(*args)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert staging_folders(tmp_path) == []
    assert json.loads((output / "config.json").read_text())["max_position_embeddings"] == 1024
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [MARKER, "README.md", "config.json", "generation_config.json", "longrope_factors.json", "model.safetensors",
         "modeling_longrope_llama.py", "tokenizer.json", "tokenizer_config.json"])
    assert (output / "model.safetensors").read_bytes() == (TESTBED / "model.safetensors").read_bytes()


def test_the_output_moved_aside_by_a_killed_run_comes_back(tmp_path):
    """Killed between its two renames, a run leaves the previous output aside; the next run, even one
    that is refused, puts it back before anything else."""
    source = tmp_path / "tiny"
    shutil.copytree(TESTBED, source)
    output = tmp_path / "out"
    assert convert(source, "--target", 512, "--factors", "pi", "--output", output).wait() == 0
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    held = convert(source, "--target", 1024, "--output", output, "--overwrite",
                   strace=hold("rename,renameat,renameat2", "2", HOLD_US))  # the second rename: the new output's
    deadline = time.monotonic() + 60
    while output.exists() or not any(".old-" in p.name for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and held.poll() is None, held.communicate(timeout=5)
        time.sleep(0.005)
    moved = next(p for p in tmp_path.iterdir() if ".old-" in p.name)
    kill_when_held(int(re.search(r"\.old-(\d+)-", moved.name).group(1)), held)
    assert not output.exists()

    refused = convert(source, "--target", 1024, "--output", output)  # no --overwrite
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and "already exists" in err
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before and staging_folders(tmp_path) == []
