"""Tiny LongRoPE models for the modeling tests: a source Llama and the same weights under the shipped code."""

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import TINY_WINDOW
from longrope_convert.convert import longrope_config
from longrope_convert.factors import FactorSet
from longrope_convert.modeling_longrope_llama import LongRoPELlamaForCausalLM, default_long_mscale
from longrope_convert.source import read_source

HALF = 8  # tiny model: head_dim 16
RAMP = [1.0 + 3.0 * i / (HALF - 1) for i in range(HALF)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def tiny_factor_set(folder: Path, long_factor=RAMP, n_hat=0, long_mscale=None, target=4 * TINY_WINDOW) -> FactorSet:
    return FactorSet(
        model=read_source(folder).fingerprint, target_length=target, long_factor=list(long_factor),
        short_factor=[1.0] * HALF, n_hat=n_hat,
        long_mscale=long_mscale or default_long_mscale(target / TINY_WINDOW, TINY_WINDOW),
        provenance={"method": "test"},
    )


def longrope_pair(folder: Path, **factor_set_fields):
    """(source model, LongRoPE model with the same weights, LongRoPE config), built through the converter's config."""
    source = LlamaForCausalLM.from_pretrained(folder).eval()
    config_dict = longrope_config(json.loads((folder / "config.json").read_text()),
                                  tiny_factor_set(folder, **factor_set_fields))
    config = LlamaConfig.from_dict(config_dict)
    model = LongRoPELlamaForCausalLM(config).eval()
    model.load_state_dict(source.state_dict())
    return source, model, config


def left_padded(batch: int, length: int, padding: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [batch, length] and their mask; the last row is left-padded with `padding` tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, :padding] = 0
    ids[-1, :padding] = 0
    return ids, mask
