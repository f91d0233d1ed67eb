"""Other transformers releases for the tests, installed once with pip (no dependencies: the venv has them)
into the test cache, and put first on PYTHONPATH of a subprocess."""

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from model_cache import cache_dir

REPOSITORY = Path(__file__).resolve().parent.parent
# What each release needs beyond the venv: the huggingface_hub and tokenizers versions it accepts (it checks
# them at import), httpx for huggingface_hub 1.x, and for 5.0-5.12 an older `kernels`: the newest transformers
# requires kernels 0.19, next to which they cannot import Llama at all (their hub_kernels.py: "Either a revision
# or a version must be specified"). 0.12.3 imports with them and maps kernels for the CPU (0.10, which 5.3's
# `kernels` extra names, cannot: test_hub_kernels.py needs that).
RELEASES = {
    "5.3.0": ["transformers==5.3.0", "huggingface_hub==1.33.0", "tokenizers==0.22.2", "httpx==0.28.1",
              "httpcore==1.0.9", "kernels==0.12.3"],
    "5.17.0": ["transformers==5.17.0", "huggingface_hub==1.33.0", "httpx==0.28.1", "httpcore==1.0.9"],
    "4.57.6": ["transformers==4.57.6", "huggingface_hub==0.36.0", "tokenizers==0.22.2"],
    "4.45.2": ["transformers==4.45.2", "huggingface_hub==0.36.0", "tokenizers==0.20.3"],
}
# Besides the installed release: the oldest supported, and one in the middle (the GPU machine's).
RELEASES_UNDER_TEST = ["5.3.0", "5.17.0"]


def release_folder(version: str) -> Path:
    """A folder with transformers `version` and what it needs, built on first use (~10 MB download); named by
    its requirements, so a changed list builds a new folder instead of reusing a stale one."""
    requirements = hashlib.sha256(" ".join(RELEASES[version]).encode()).hexdigest()[:8]
    folder = cache_dir() / f"transformers-{version}-{requirements}"
    if (folder / "transformers").is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        staging = Path(work) / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--target", str(staging), *RELEASES[version]], check=True)
        os.replace(staging, folder)
    return folder


def run_python(version: str, *arguments: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python ARGUMENTS` in the repository with transformers `version` first on the path."""
    path = [str(release_folder(version)), str(REPOSITORY / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(part for part in path if part)}
    return subprocess.run([sys.executable, *arguments], cwd=REPOSITORY, env=env, capture_output=True, text=True,
                          timeout=timeout)
