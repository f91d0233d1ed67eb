"""A source checkpoint's own RoPE as a base factor set: what LongRoPE composes with.

Every RoPE scaling that transformers applies per frequency dimension is, relative to the default
frequencies theta_i = b^(-2i/d) (base b = rope_theta, head dimension d, i = 0 .. d/2 - 1), a factor
lambda_i >= 1 and an attention factor:

    inv_freq_i = 1 / (lambda_i * b^(2i/d)),        cos, sin multiplied by the attention factor

One function per `rope_type` (BASE_FACTOR_SETS) computes lambda and the attention factor from the
source's RoPE parameters, with the formulas of transformers' modeling_rope_utils.py (5.x) in Python
floats: conversion never imports torch, and a GGUF export can write them as rope_freqs. The tests
compare each with transformers' own function (lambda_i = default inv_freq_i / that type's inv_freq_i).

    default   lambda_i = 1
    linear    lambda_i = factor                                     (_compute_linear_scaling_rope_parameters)
    llama3    lambda_i = 1 where the wavelength 2 pi b^(2i/d) < L0 / high_freq_factor, factor where it is
              > L0 / low_freq_factor, else 1 / ((1 - a) / factor + a) with
              a = (L0 / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
              (L0: llama3's original_max_position_embeddings; _compute_llama3_parameters)
    yarn      lambda_i = 1 / ((1 - r_i) + r_i / factor), r_i YaRN's ramp from 0 at the dimension that turns
              beta_fast times over L0 to 1 at the one that turns beta_slow times; attention factor
              0.1 ln(factor) + 1, or the ratio of the mscale / mscale_all_dim terms, or attention_factor
              (_compute_yarn_parameters)
    longrope  two sets: short_factor up to its original window, long_factor beyond it, each with its attention
              factor (sqrt(1 + ln s / ln L) by default; _compute_longrope_parameters), and n_hat
    dynamic   refused: dynamic NTK changes the frequencies with the sequence length

A base factor set holds a short set (what the source computes inside its window, and what a converted
checkpoint keeps there) and a long set (what new long factors multiply). For every type but longrope
the two are the source's one set; a LongRoPE source keeps its own two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import RopeScalingError

DEFAULT_ROPE = {"rope_type": "default"}


@dataclass(frozen=True)
class BaseFactorSet:
    """A source's own RoPE as LongRoPE factor sets (lambda relative to b^(-2i/d), [d/2] Python floats each).

    original_max_position_embeddings: the window the short set serves: a converted checkpoint switches to its
    long set beyond it. max_position_embeddings: how far the source already reaches (a LongRoPE source: its
    target); a new target must exceed it, and new long factors extend from it. pretraining_window: the window
    before any scaling (llama3's and yarn's original, a LongRoPE source's original window).
    source_rope: the RoPE the shipped modeling file computes for positions below n_hat, and for the short set
    when short_set is "source" (`longrope.source_rope` of a converted config). rope_scaling: the parameters as
    read, with what transformers derives filled in: what a factor file's model fingerprint records.
    n_hat_mscale: a LongRoPE source's attention scale below n_hat (factors.FactorSet.n_hat_mscale); None for
    other sources, which have no n_hat.
    """

    rope_type: str
    short_factor: list[float]
    short_mscale: float
    long_factor: list[float]
    long_mscale: float
    original_max_position_embeddings: int
    max_position_embeddings: int
    pretraining_window: int
    n_hat: int
    short_set: str  # "source": the source_rope frequencies exactly; "factors": 1 / (short_factor_i * b^(2i/d))
    source_rope: dict[str, Any]
    rope_scaling: dict[str, Any]
    n_hat_mscale: str | None = None

    @property
    def short_is_source_rope(self) -> bool:
        """Whether the short set computes exactly the source_rope angles, so that n_hat (source angles below it, in
        either set) cannot change the model inside its window."""
        return self.short_set == "source" or (self.source_rope == DEFAULT_ROPE
                                              and all(f == 1.0 for f in self.short_factor))


def default_base(rope: dict[str, Any], rope_theta: float, head_dim: int,
                 max_position_embeddings: int) -> BaseFactorSet:
    """No scaling: lambda_i = 1, attention factor 1 (RoFormer, arXiv 2104.09864). Reads no keys."""
    return _one_set(DEFAULT_ROPE, [1.0] * (head_dim // 2), 1.0, max_position_embeddings)


def linear_base(rope: dict[str, Any], rope_theta: float, head_dim: int,
                max_position_embeddings: int) -> BaseFactorSet:
    """Position interpolation (arXiv 2306.15595): lambda_i = `factor`, attention factor 1."""
    factor = _number(rope, "factor", minimum=1.0)
    return _one_set({"rope_type": "linear", "factor": factor}, [factor] * (head_dim // 2), 1.0,
                    max_position_embeddings)


def llama3_base(rope: dict[str, Any], rope_theta: float, head_dim: int,
                max_position_embeddings: int) -> BaseFactorSet:
    """Llama 3.1's scaling (arXiv 2407.21783). Reads `factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`; attention factor 1."""
    factor = _number(rope, "factor", minimum=1.0)
    low, high = _number(rope, "low_freq_factor"), _number(rope, "high_freq_factor")
    original = _window(rope)
    if not 0 < low < high:
        raise RopeScalingError(f"field 'high_freq_factor': must exceed low_freq_factor > 0, got {high} and {low}")
    recorded = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": original}
    factors = llama3_factors(factor, head_dim, rope_theta, original, low, high)
    return _one_set(recorded, factors, 1.0, max_position_embeddings, pretraining_window=original)


def yarn_base(rope: dict[str, Any], rope_theta: float, head_dim: int,
              max_position_embeddings: int) -> BaseFactorSet:
    """YaRN (arXiv 2309.00071) as transformers computes it. Reads `factor` (default: max_position_embeddings /
    original), `original_max_position_embeddings`, `beta_fast` (32), `beta_slow` (1), `truncate` (true) and, for
    the attention factor, `attention_factor`, else `mscale` / `mscale_all_dim`, else 0.1 ln(factor) + 1."""
    original = _window(rope)
    factor = rope.get("factor")
    factor = max_position_embeddings / original if factor is None else _number(rope, "factor", minimum=1.0)
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    else:
        attention_factor = _number(rope, "attention_factor", minimum=0.0)
    ramp = yarn_ramp(head_dim, rope_theta, original, rope.get("beta_fast") or 32, rope.get("beta_slow") or 1,
                     rope.get("truncate", True))
    factors = [1.0 / ((1.0 - r) + r / factor) for r in ramp]
    optional = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")
    recorded = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                **{key: rope[key] for key in optional if key in rope}}
    # `factor` is the post-YaRN window over the pre-YaRN one (transformers' _validate_yarn_rope_parameters), so a
    # config that left max_position_embeddings at the original window still serves original x factor.
    window = max(max_position_embeddings, round(original * factor))
    return _one_set(recorded, factors, float(attention_factor), window, pretraining_window=original)


def longrope_base(rope: dict[str, Any], rope_theta: float, head_dim: int,
                  max_position_embeddings: int) -> BaseFactorSet:
    """A LongRoPE source (arXiv 2402.13753): `short_factor` up to `original_max_position_embeddings`, `long_factor`
    beyond, `attention_factor` for the long set (default sqrt(1 + ln f / ln L), f = `factor` or
    max_position_embeddings / L), and the keys of a converted config's `longrope`: `n_hat` (0), `n_hat_mscale`
    ("row"), `short_mscale` (default: the attention factor, which stock transformers applies to both sets),
    `short_set` ("factors"), `source_rope` (the default RoPE)."""
    half = head_dim // 2
    original = _window(rope)
    reach = rope.get("max_position_embeddings", max_position_embeddings)
    factor = rope.get("factor")
    factor = reach / original if factor is None else _number(rope, "factor")
    attention_factor = rope.get("attention_factor")
    attention_factor = (longrope_attention_factor(factor, original) if attention_factor is None
                        else _number(rope, "attention_factor", minimum=0.0))
    short_mscale = rope.get("short_mscale")
    short_mscale = attention_factor if short_mscale is None else _number(rope, "short_mscale", minimum=0.0)
    sets = {name: _factor_list(rope, name, half) for name in ("short_factor", "long_factor")}
    n_hat = rope.get("n_hat", 0)
    if isinstance(n_hat, bool) or not isinstance(n_hat, int) or not 0 <= n_hat < original:
        raise RopeScalingError(f"field 'n_hat': must be an integer in [0, {original}), got {n_hat!r}")
    n_hat_mscale = rope.get("n_hat_mscale", "row")
    if n_hat_mscale not in ("row", "short"):
        raise RopeScalingError(f"field 'n_hat_mscale': must be 'row' or 'short', got {n_hat_mscale!r}")
    short_set = rope.get("short_set", "factors")
    if short_set not in ("source", "factors"):
        raise RopeScalingError(f"field 'short_set': must be 'source' or 'factors', got {short_set!r}")
    source_rope = rope.get("source_rope") or DEFAULT_ROPE
    if not isinstance(source_rope, dict) or source_rope.get("rope_type", "default") in ("longrope", "dynamic"):
        raise RopeScalingError(f"field 'source_rope': must be the RoPE of a source that is not LongRoPE, got "
                               f"{source_rope!r}")
    source_rope = base_factor_set(source_rope, rope_theta, head_dim, original).source_rope
    recorded = {"rope_type": "longrope", **sets, "original_max_position_embeddings": original, "factor": factor,
                "attention_factor": attention_factor, "max_position_embeddings": reach, "n_hat": n_hat,
                "short_mscale": short_mscale, "short_set": short_set, "source_rope": source_rope}
    if "n_hat_mscale" in rope:  # recorded only when given, so that sources read before the key keep their fingerprint
        recorded["n_hat_mscale"] = n_hat_mscale
    return BaseFactorSet(
        rope_type="longrope", short_factor=sets["short_factor"], short_mscale=short_mscale,
        long_factor=sets["long_factor"], long_mscale=attention_factor, original_max_position_embeddings=original,
        max_position_embeddings=reach, pretraining_window=original, n_hat=n_hat, short_set=short_set,
        source_rope=source_rope, rope_scaling=recorded, n_hat_mscale=n_hat_mscale)


BASE_FACTOR_SETS: dict[str, Callable[[dict[str, Any], float, int, int], BaseFactorSet]] = {
    "default": default_base,
    "linear": linear_base,
    "llama3": llama3_base,
    "yarn": yarn_base,
    "longrope": longrope_base,
}


def base_factor_set(rope: dict[str, Any], rope_theta: float, head_dim: int,
                    max_position_embeddings: int) -> BaseFactorSet:
    """The base factor set of a source with these RoPE parameters (transformers' names, `rope_type` among them,
    without rope_theta), rope_theta, head dimension and max_position_embeddings (the window it serves).

    Raises RopeScalingError for `dynamic` (no fixed frequencies), any type not in BASE_FACTOR_SETS, and
    parameters that are missing or out of range.
    """
    rope_type = rope.get("rope_type", "default")
    if rope_type == "dynamic":
        raise RopeScalingError(
            "rope_type 'dynamic' (dynamic NTK) changes its frequencies with the sequence length, so it has no fixed "
            "per-dimension factors to compose LongRoPE with; convert a copy whose config.json has no rope_scaling")
    if rope_type not in BASE_FACTOR_SETS:
        raise RopeScalingError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(BASE_FACTOR_SETS)})")
    return BASE_FACTOR_SETS[rope_type](rope, rope_theta, head_dim, max_position_embeddings)


def llama3_factors(factor: float, head_dim: int, rope_theta: float, original_max_position_embeddings: int,
                   low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> list[float]:
    """transformers' llama3 RoPE as lambda [d/2] (formula in the module docstring): 1 for high frequencies,
    `factor` for low ones, a smooth blend between."""
    factors = []
    for i in range(head_dim // 2):
        wavelength = 2 * math.pi * rope_theta ** (2 * i / head_dim)
        if wavelength < original_max_position_embeddings / high_freq_factor:
            factors.append(1.0)
        elif wavelength > original_max_position_embeddings / low_freq_factor:
            factors.append(factor)
        else:
            smooth = ((original_max_position_embeddings / wavelength - low_freq_factor)
                      / (high_freq_factor - low_freq_factor))
            factors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return factors


def yarn_ramp(head_dim: int, rope_theta: float, original_max_position_embeddings: int, beta_fast: float = 32,
              beta_slow: float = 1, truncate: bool = True, end: int | None = None) -> list[float]:
    """YaRN's ramp r_i in [0, 1] over the d/2 dimensions: 0 up to the dimension that turns `beta_fast` times over
    the original window (kept), 1 from the one that turns `beta_slow` times (interpolated), linear between; with
    `truncate` the ends are rounded outwards to whole dimensions (transformers' find_correction_range). `end`
    moves the upper end to that dimension (factors' yarn-cd: the critical dimension)."""

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(rope_theta)))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    if end is not None:
        low, high = min(low, end), end
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    return [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(head_dim // 2)]


def critical_dimension(head_dim: int, rope_theta: float, window: int) -> int:
    """LongRoPE2's critical dimension (arXiv 2502.20082): of the d/2 frequency dimensions (counted from 0), the last
    whose period 2 pi b^(2i/d) is shorter than the pretraining window L, ceil(d/2 log_b(L / 2 pi)) - 1, as the
    released search computes it (microsoft/LongRoPE PR #23, evolution/search.py at 5e669a53: `critical_dim`).
    Dimensions up to it turned full periods in pretraining; those beyond it never did, and LongRoPE2 gives them
    lambda >= the extension. Llama-3-8B (d 128, b 500,000, L 8,192): 34 of 64; SmolLM2 (d 64, b 100,000, L 8,192):
    19 of 32. Clamped to [0, d/2 - 1], so that at least the slowest dimension is beyond it."""
    dimension = math.ceil(head_dim / 2 * math.log(window / (2 * math.pi)) / math.log(rope_theta)) - 1
    return min(max(dimension, 0), head_dim // 2 - 1)


def critical_ramp(top: float, critical: int, half: int) -> list[float]:
    """lambda_i = top^(i / critical) below the critical dimension, `top` from it on ([half] floats): the geometric
    ramp that LongRoPE2's search gives the dimensions below it (`ntk_left` in the released dim_mono.py), continuous
    at the critical dimension."""
    return [top ** (i / critical) if i < critical else top for i in range(half)]


def longrope_attention_factor(scale: float, original_max_position_embeddings: int) -> float:
    """sqrt(1 + ln(s) / ln(L)), 1.0 when s <= 1: LongRoPE's attention scale for an extension by s of a window L
    (paper eq. 4; transformers' _compute_longrope_parameters default). The shipped modeling file has the same
    formula (default_long_mscale), which conversion cannot import: it imports torch."""
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_position_embeddings))


def long_attention_scales(base: BaseFactorSet, target_length: int) -> dict[str, float]:
    """The attention scales considered for a long set composed on `base` at `target_length`, by rule name; the
    first is the default. (One rule when both give the same value, as for a source that does not scale RoPE.)

    extension: the source's own long attention factor x sqrt(1 + ln s / ln L) for s = target / L, L = the length
    the source already serves. The source attends correctly with its own factor up to L (Llama 3.1 was trained
    there), so only the extension beyond L calls for more: LongRoPE's rule, applied to that extension.
    pretraining: sqrt(1 + ln s / ln L0) for the whole extension from the window before any scaling, L0, as if
    the source's own scaling and the new one were a single LongRoPE extension (for a LongRoPE source: the rule
    of its first stage, carried to the new target).
    """
    reach, before = base.max_position_embeddings, base.pretraining_window
    scales = {"extension": base.long_mscale * longrope_attention_factor(target_length / reach, reach)}
    pretraining = longrope_attention_factor(target_length / before, before)
    if pretraining != scales["extension"]:
        scales["pretraining"] = pretraining
    return scales


def _one_set(recorded: dict[str, Any], factors: list[float], attention_factor: float, window: int,
             pretraining_window: int | None = None) -> BaseFactorSet:
    factors = monotone_factors(factors)
    return BaseFactorSet(
        rope_type=recorded["rope_type"], short_factor=factors, short_mscale=attention_factor,
        long_factor=list(factors), long_mscale=attention_factor, original_max_position_embeddings=window,
        max_position_embeddings=window, pretraining_window=pretraining_window or window, n_hat=0,
        # the default RoPE is exactly short factors 1.0: no source frequencies needed
        short_set="factors" if recorded == DEFAULT_ROPE else "source",
        source_rope=dict(recorded), rope_scaling=dict(recorded))


def monotone_factors(factors: list[float]) -> list[float]:
    """Factors clamped to >= 1 and made non-decreasing, to absorb float rounding (a factor set only interpolates,
    lower frequencies more)."""
    result, floor = [], 1.0
    for factor in factors:
        floor = max(floor, factor)
        result.append(floor)
    return result


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _number(rope: dict[str, Any], key: str, minimum: float | None = None) -> float:
    value = rope.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RopeScalingError(f"field '{key}': must be a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise RopeScalingError(f"field '{key}': must be >= {minimum:g}, got {value}")
    return float(value)


def _window(rope: dict[str, Any]) -> int:
    value = rope.get("original_max_position_embeddings")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RopeScalingError(f"field 'original_max_position_embeddings': must be a positive integer, got {value!r}")
    return value


def _factor_list(rope: dict[str, Any], key: str, half: int) -> list[float]:
    values = rope.get(key)
    if not isinstance(values, list) or len(values) != half:
        count = len(values) if isinstance(values, list) else type(values).__name__
        raise RopeScalingError(f"field '{key}': must be a list of head_dim/2 = {half} numbers, got {count}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
            raise RopeScalingError(f"field '{key}[{i}]': must be a finite number >= 1, got {value!r}")
    if key == "long_factor":
        for i in range(1, half):
            if values[i] < values[i - 1]:
                raise RopeScalingError(f"field 'long_factor[{i}]': must be non-decreasing, got {values[i]} after "
                                       f"{values[i - 1]}")
    return [float(v) for v in values]
