"""The real SmolLM2-135M (window 8192): conversion, exactness, long-context perplexity, cache switching."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from longrope_convert.convert import write_checkpoint
from longrope_convert.factors import analytic_factor_set
from longrope_convert.perplexity import document_ids, perplexity, token_nll
from longrope_convert.source import read_source
from test_modeling import greedy_logits_vs_recompute

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2_16k(smollm2_dir, tmp_path_factory):
    source = read_source(smollm2_dir)
    output = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-longrope-16k"
    write_checkpoint(source, analytic_factor_set("yarn", source.fingerprint, 16384), output, "init:yarn")
    return output


def test_converted_folder_keeps_tokenizer_and_generation_config(smollm2_dir, smollm2_16k):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (smollm2_16k / name).read_bytes() == (smollm2_dir / name).read_bytes()
    assert os.stat(smollm2_16k / "model.safetensors").st_ino == os.stat(smollm2_dir / "model.safetensors").st_ino
    tokenizer = AutoTokenizer.from_pretrained(smollm2_16k)
    assert tokenizer("Holmes").input_ids == AutoTokenizer.from_pretrained(smollm2_dir)("Holmes").input_ids


@torch.inference_mode()
def test_short_inputs_are_bit_identical_to_the_source(smollm2_dir, smollm2_16k, sherlock_text):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = document_ids(tokenizer, sherlock_text, 2048)
    source = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(smollm2_16k, trust_remote_code=True, dtype=torch.float32)
    assert (converted(ids).logits - source(ids).logits).abs().max().item() == 0.0


def test_perplexity_at_16k_stays_close_to_8k(smollm2_16k, sherlock_text):
    """YaRN-init factors at 2x: ppl over 16k tokens within 1.25x of ppl over the first 8k (unscaled RoPE: ~2x)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_16k)
    model = AutoModelForCausalLM.from_pretrained(smollm2_16k, trust_remote_code=True, dtype=torch.float32)
    nll = token_nll(model, document_ids(tokenizer, sherlock_text, 16384))[0]
    at_16k = perplexity(nll)
    at_8k = perplexity(token_nll(model, document_ids(tokenizer, sherlock_text, 8192))[0])
    print(f"SmolLM2 yarn-init 16k: ppl 8k {at_8k:.3f}, 16k {at_16k:.3f}, last quarter {perplexity(nll[-4096:]):.3f}")
    assert at_16k <= 1.25 * at_8k
    assert perplexity(nll[-4096:]) <= 1.25 * at_8k


@torch.inference_mode()
def test_cached_generation_across_the_window_on_the_real_model(smollm2_dir, tmp_path, sherlock_text):
    """Same weights with the window declared as 512, so that crossing it is cheap to check."""
    shrunk = tmp_path / "smollm2-512"
    shutil.copytree(smollm2_dir, shrunk, copy_function=os.link)
    config = json.loads((smollm2_dir / "config.json").read_text())
    (shrunk / "config.json").unlink()  # a hard link to the cached original: replace, don't edit
    (shrunk / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    source = read_source(shrunk)
    write_checkpoint(source, analytic_factor_set("yarn", source.fingerprint, 1024), tmp_path / "out", "init:yarn")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(shrunk)
    ids = document_ids(tokenizer, sherlock_text, 508).repeat(2, 1)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = tokenizer.pad_token_id, 0
    assert greedy_logits_vs_recompute(model, ids, mask, 12) <= 1e-5
