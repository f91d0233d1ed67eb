import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model_cache import smollm2_folder

DATA = Path(__file__).parent / "data"
TINY_WINDOW = 64


def pytest_report_header(config) -> str:
    """Name CI's transformers matrix in the output: the installed release, then the ones run in subprocesses."""
    import transformers

    from transformers_releases import RELEASES_UNDER_TEST

    return (f"transformers {transformers.__version__} (installed: every test); modeling tests also under "
            f"{', '.join(RELEASES_UNDER_TEST)} (test_transformers_releases.py)")


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=TINY_WINDOW, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (head_dim 16, window 64) saved as an fp32 safetensors folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_source(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may modify."""
    folder = tmp_path / "tiny-llama"
    shutil.copytree(tiny_llama_dir, folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M (30 layers, head_dim 64, window 8192) as an fp32 folder, cached across runs."""
    return smollm2_folder()


@pytest.fixture(scope="session")
def sherlock_text() -> str:
    return (DATA / "sherlock_holmes_excerpt.txt").read_text()
