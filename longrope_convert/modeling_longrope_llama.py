"""LongRoPE for Llama: rotary embeddings with searched per-dimension factors.

This file is copied verbatim into every checkpoint that longrope-convert writes and is loaded with
`trust_remote_code=True`, so it imports only torch, transformers and the standard library. The search
and the evaluation in the longrope-convert package import the same file: there is one implementation
of the math. It runs on transformers 5.3 and later 5.x releases; what differs between them is in the
compatibility section below, and an older release stops at import with one line naming the minimum.

LongRoPE (arXiv 2402.13753) rescales each rotary frequency with its own factor and keeps the first
n_hat positions un-interpolated. For head dimension d, base b and i = 0 .. d/2 - 1:

    theta_i          = b^(-2i/d)                        (the default RoPE frequencies)
    source_i                                            (the source model's own frequencies: theta_i,
                                                         or its linear / llama3 / yarn scaling of them)
    angle_i(p)       = p * source_i                     if p < n_hat
                     = p * theta_i / lambda_i           otherwise
    cos, sin         = mscale * cos(angle), mscale * sin(angle)

where mscale is the attention scale of the factor set the sequence uses (its row, or its document in a
packed row). Below n_hat it is the short set's instead when `longrope.n_hat_mscale` is "short" (with the
source's own short set, the first positions are then the source's cos and sin exactly, as LongRoPE's
research code keeps them), and the sequence's set's when it is "row" or absent (checkpoints written before
the key existed).

All of it in float32 whatever the model's dtype, also after the loaded model is cast (`.to(torch.bfloat16)`,
`.half()`), where transformers' own rotary embeddings round their frequencies; cos and sin are cast to the
dtype of the hidden states at the end.

Two factor sets are kept: `short` for sequences that fit the original window and `long` for longer
ones, each with its own mscale. A sequence is "long" once its largest position reaches the original
window (max(position) + 1 > original_max_position_embeddings), the same rule as the built-in `longrope`
type, but decided per sequence so that its output never depends on its batch-mates: per row, and per
document in rows packed with several documents (positions restarting, no attention mask), as transformers'
attention mask keeps them apart. Packed rows cannot be continued from a cache (an error says so).
The short set is lambda_i from `short_factor` (1.0: the source model exactly), or, for a source that
already scales RoPE, the source's own frequencies (`short_set: "source"`). Defaults: short mscale 1.0,
long mscale sqrt(1 + ln(s) / ln(original_max_position_embeddings)) with s = target / original.

When cached generation crosses the original window, the cache holds keys and values computed with
the short set. Re-rotating the cached keys by the difference of angles is exact for the first layer
only: every deeper layer's keys and values came from hidden states that attended with the short set.
So `LongRoPELlamaModel` recomputes the cache of the rows that switch, once, with the long set (a
prefill of the prefix), and cached generation then equals a full recompute without cache. The same
happens in reverse when a cache is cropped back into the window (assisted decoding). Supported for
`DynamicCache` and `StaticCache`; other cache layouts raise a clear error when a switch is needed.
To recompute a prefix the model must know its inputs: `generate` hands them over at every step, and
for manual loops (a cache passed back, or the one a call returned) the model records on the cache
what it has seen, token ids or embeddings.

Config: the standard `rope_scaling` (read by transformers as `rope_parameters`) with
`rope_type: "longrope"`, `long_factor`, `short_factor`, `original_max_position_embeddings`, `factor`
and `attention_factor` (the long mscale), plus a top-level `longrope` dict that stock transformers
ignores: `n_hat`, `n_hat_mscale` ("row", the default, or "short"), `short_mscale`, and for sources that
already scale RoPE `source_rope` (the source's RoPE parameters as transformers names them, without
rope_theta) and `short_set` ("source" or "factors", the default).
"""

import inspect
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from torch import nn

# ---------------------------------------------------------------------------------------------------
# Compatibility with transformers releases: everything that differs between the releases this file
# supports is named here, and the code below uses only these names.
#
# Minimum 5.3: from 5.0 on, rope settings live in `config.rope_parameters`, caches are lists of layers
# (`cache.layers[i].keys`) built with `DynamicCache(config=...)`, and models are initialised with
# `_init_weights` after loading; 4.x has none of these. From 5.3 on, `generate` keeps full-length
# `position_ids` among its inputs (5.0-5.2 do not; the rebuild below then derives positions from the
# attention mask, the same way `generate` does, but those releases are not tested).
MIN_TRANSFORMERS = (5, 3)
TRANSFORMERS_VERSION = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
    raise ImportError(
        f"This LongRoPE checkpoint's modeling code needs transformers >= 5.3 (found {transformers.__version__}): "
        "pip install -U 'transformers>=5.3,<6'"
    )

from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticLayer  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
)

# The keyword under which a Llama backbone takes its cache, and the field of its output that returns it:
# `cache` from 5.24 (`past_key_values` still accepted, deprecated), `past_key_values` in 5.3 - 5.23.
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
# ---------------------------------------------------------------------------------------------------

def default_long_mscale(scale: float, original_max_position_embeddings: int) -> float:
    """Attention scale for the long factor set: sqrt(1 + ln(s) / ln(L)), 1.0 when s <= 1.

    s = target / original window, L = original window (LongRoPE paper, eq. 4; Phi-3's `longrope`).
    """
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_position_embeddings))


def rope_inv_freq(base: float, dim: int, factors: torch.Tensor | list[float] | None = None) -> torch.Tensor:
    """inv_freq_i = 1 / (lambda_i * base^(2i/d)), [d/2] float32, with the operations of transformers' default
    RoPE (`compute_default_rope_parameters`), so that lambda = 1 gives its frequencies bit for bit."""
    wavelength_over_2pi = base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim)
    if factors is None:
        return 1.0 / wavelength_over_2pi
    return 1.0 / (torch.as_tensor(factors, dtype=torch.float) * wavelength_over_2pi)


# --- The source model's own RoPE -------------------------------------------------------------------
# One function per `rope_type` a source may carry, each computing inv_freq [d/2] in float32 with the
# same float32 operations as the function transformers registers for that type in ROPE_INIT_FUNCTIONS
# (modeling_rope_utils.py; their bodies are the same from 5.3 to 5.25), so that a converted checkpoint
# of such a source is that source, bit for bit, inside the source's window.


def default_source_inv_freq(rope: dict, base: float, dim: int, window: int) -> torch.Tensor:
    """theta_i = base^(-2i/d) (RoFormer, arXiv 2104.09864). Reads no keys."""
    return rope_inv_freq(base, dim)


def linear_source_inv_freq(rope: dict, base: float, dim: int, window: int) -> torch.Tensor:
    """theta_i / factor: position interpolation (arXiv 2306.15595). Reads `factor`."""
    inv_freq = rope_inv_freq(base, dim)
    inv_freq /= rope["factor"]
    return inv_freq


def llama3_source_inv_freq(rope: dict, base: float, dim: int, window: int) -> torch.Tensor:
    """Llama 3.1's scaling (arXiv 2407.21783): frequencies with wavelength > original / low_freq_factor are
    divided by `factor`, those with wavelength < original / high_freq_factor kept, a smooth blend between.
    Reads `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`."""
    inv_freq = rope_inv_freq(base, dim)
    factor = rope["factor"]
    low_freq_factor = rope["low_freq_factor"]
    high_freq_factor = rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def yarn_source_inv_freq(rope: dict, base: float, dim: int, window: int) -> torch.Tensor:
    """YaRN's frequencies (arXiv 2309.00071): interpolated by `factor` below a linear ramp between the
    dimensions that turn beta_slow and beta_fast times over the original window, extrapolated above.
    Reads `factor`, `original_max_position_embeddings` (default: the source's window), `beta_fast` (32),
    `beta_slow` (1), `truncate` (true). Its attention factor is `longrope.short_mscale`."""
    factor = rope["factor"]
    original_max_position_embeddings = rope.get("original_max_position_embeddings") or window
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1
    truncate = rope.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(dtype=torch.float)
    return inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor


SOURCE_INV_FREQ = {
    "default": default_source_inv_freq,
    "linear": linear_source_inv_freq,
    "llama3": llama3_source_inv_freq,
    "yarn": yarn_source_inv_freq,
}


def source_inv_freq(source_rope: dict, base: float, dim: int, window: int) -> torch.Tensor:
    """The source model's inv_freq [d/2] float32 from `longrope.source_rope` (rope_type default when absent).

    `window` is the source's context window (rope_scaling's original_max_position_embeddings). Raises
    ValueError for `dynamic` (its frequencies change with the sequence length, so there are none to keep)
    and for any type not in SOURCE_INV_FREQ.
    """
    rope_type = source_rope.get("rope_type", "default")
    if rope_type not in SOURCE_INV_FREQ:
        why = " (its frequencies change with the sequence length)" if rope_type == "dynamic" else ""
        raise ValueError(
            f"LongRoPE: the source's rope_type '{rope_type}' is not supported{why}; supported: "
            f"{', '.join(SOURCE_INV_FREQ)}"
        )
    return SOURCE_INV_FREQ[rope_type](source_rope, base, dim, window)


def rotary_angles(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, source_inv_freq: torch.Tensor, n_hat: int
) -> torch.Tensor:
    """Angles [batch, seq, d/2] in float32: p * inv_freq, with the source's angles at positions < n_hat.

    `position_ids` is [batch, seq]; `inv_freq` is [d/2], or per token [batch, seq, d/2] (or [batch, 1, d/2] per
    row); `source_inv_freq` is [d/2].
    """
    positions = position_ids[..., None].float()
    angles = positions * inv_freq
    if n_hat > 0:
        angles = torch.where(positions < n_hat, positions * source_inv_freq, angles)
    return angles


def document_index(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] long: which document of its row each token belongs to (0, 1, ...).

    A document starts at the first token and wherever a position does not follow the one before it by 1: rows
    packed with several documents, their positions restarting at 0 (DataCollatorWithFlattening). It is the rule
    of transformers' `masking_utils.find_packed_sequence_indices` (the same in every supported release), by which
    the attention mask keeps such documents apart when there is neither an attention mask nor a cache. (Flash
    attention's varlen path starts one wherever the row's smallest position recurs: the same for documents that
    each start at 0.)
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.cumsum(-1) - 1


def document_last_positions(position_ids: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """[batch, seq]: for each token, the largest position of its document (`documents` from document_index)."""
    largest = torch.zeros_like(position_ids).scatter_reduce(-1, documents, position_ids, "amax", include_self=False)
    return largest.gather(-1, documents)


class LongRoPEScaledRotaryEmbedding(nn.Module):
    """Rotary embedding with short/long per-dimension factors, n_hat and per-set attention scales.

    Frequencies are float32 buffers (recomputed from the config, never saved). A load in bf16 or fp16 keeps them
    float32, as transformers does for its own rotary embeddings, and so does a cast of the loaded model
    (`.to(torch.bfloat16)`, `.half()`): see `_apply`.

    Which set a token uses: the long one once the largest position of its document reaches beyond the original
    window; a row is one document unless its positions restart (see `document_index`). `factor_sets` overrides
    that per row, or per token.
    """

    def __init__(self, config, device=None):
        super().__init__()
        rope = config.rope_parameters
        extras = getattr(config, "longrope", None) or {}
        self.dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.base = float(rope["rope_theta"])
        self.original_max_position_embeddings = int(rope["original_max_position_embeddings"])
        scale = rope.get("factor") or config.max_position_embeddings / self.original_max_position_embeddings
        long_mscale = rope.get("attention_factor")
        self.long_mscale = float(
            default_long_mscale(scale, self.original_max_position_embeddings) if long_mscale is None else long_mscale
        )
        self.short_mscale = float(extras.get("short_mscale", 1.0))
        self.n_hat = int(extras.get("n_hat", 0))
        self.n_hat_mscale = extras.get("n_hat_mscale", "row")
        if self.n_hat_mscale not in ("row", "short"):
            raise ValueError(f"LongRoPE: longrope.n_hat_mscale must be 'row' or 'short', got {self.n_hat_mscale!r}")
        self.source_rope = dict(extras.get("source_rope") or {"rope_type": "default"})
        self.short_set = extras.get("short_set", "factors")
        if self.short_set not in ("source", "factors"):
            raise ValueError(f"LongRoPE: longrope.short_set must be 'source' or 'factors', got {self.short_set!r}")
        self.short_factor = [float(x) for x in rope["short_factor"]]
        self.long_factor = [float(x) for x in rope["long_factor"]]
        if len(self.short_factor) != self.dim // 2 or len(self.long_factor) != self.dim // 2:
            raise ValueError(
                f"LongRoPE factors must have head_dim/2 = {self.dim // 2} entries, got "
                f"{len(self.short_factor)} short and {len(self.long_factor)} long"
            )
        source = source_inv_freq(self.source_rope, self.base, self.dim, self.original_max_position_embeddings)
        # Explicitly float32: from_pretrained(dtype=bf16) builds the model under a bf16 default dtype.
        self.source_inv_freq = nn.Buffer(torch.empty_like(source, device=device), persistent=False)
        self.short_inv_freq = nn.Buffer(torch.empty_like(source, device=device), persistent=False)
        self.long_inv_freq = nn.Buffer(torch.empty_like(source, device=device), persistent=False)
        self._long_tokens = None
        if self.source_inv_freq.device.type != "meta":
            self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the frequency buffers from the config's values (also after loading on the meta device)."""
        source = source_inv_freq(self.source_rope, self.base, self.dim, self.original_max_position_embeddings)
        self.source_inv_freq.copy_(source)
        self.short_inv_freq.copy_(source if self.short_set == "source" else rope_inv_freq(self.base, self.dim, self.short_factor))
        self.long_inv_freq.copy_(rope_inv_freq(self.base, self.dim, self.long_factor))

    @torch.no_grad()
    def set_factors(
        self,
        long_factor=None,
        short_factor=None,
        n_hat: int | None = None,
        long_mscale: float | None = None,
        short_mscale: float | None = None,
    ) -> None:
        """Swap factors in place (no model reload): what the search does for every candidate. Short factors
        replace a source short set (`short_set` becomes "factors")."""
        if long_factor is not None:
            self.long_factor = [float(x) for x in long_factor]
            self.long_inv_freq.copy_(rope_inv_freq(self.base, self.dim, self.long_factor))
        if short_factor is not None:
            self.short_factor = [float(x) for x in short_factor]
            self.short_set = "factors"
            self.short_inv_freq.copy_(rope_inv_freq(self.base, self.dim, self.short_factor))
        if n_hat is not None:
            self.n_hat = int(n_hat)
        if long_mscale is not None:
            self.long_mscale = float(long_mscale)
        if short_mscale is not None:
            self.short_mscale = float(short_mscale)

    def _apply(self, fn, recurse=True):
        """Moves and casts of the model (`.to()`, `.half()`, `.cuda()`, ...) go through here. Moves apply to the
        frequency buffers, casts do not: rounded to bf16 they would move angles far (SmolLM2's searched 16k factors:
        by up to 14.5 rad at position 16,383). A buffer the cast left in another dtype is the float32 one it held
        (set_factors' values included), moved where the cast put it."""
        held = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, moved in self._buffers.items():
            if moved is not None and moved.dtype != torch.float32:
                self._buffers[name] = held[name].to(moved.device)
        return self

    def rows_are_long(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[batch] bool: a row uses the long set once its largest position is beyond the original window."""
        return position_ids.amax(dim=-1) + 1 > self.original_max_position_embeddings

    def tokens_are_long(self, position_ids: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, seq] bool: a token uses the long set once the largest position of its document is beyond the
        original window (a row is one document unless its positions restart; `documents`: their document_index)."""
        documents = document_index(position_ids) if documents is None else documents
        return document_last_positions(position_ids, documents) + 1 > self.original_max_position_embeddings

    def angles_and_mscale(self, position_ids: torch.Tensor, long_tokens: torch.Tensor):
        """Angles [batch, seq, d/2] and mscale [batch, seq] in float32 for `position_ids` [batch, seq], each token
        with the factor set `long_tokens` gives it ([batch, seq] bool, or [batch, 1] per row; True: long)."""
        inv_freq = torch.where(long_tokens[..., None], self.long_inv_freq, self.short_inv_freq)
        angles = rotary_angles(position_ids, inv_freq, self.source_inv_freq, self.n_hat)
        mscales = torch.tensor([self.short_mscale, self.long_mscale], dtype=torch.float32, device=angles.device)
        return angles, mscales[long_tokens.long()]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [batch, seq, d] in the dtype of `x` (the hidden states) for `position_ids` [batch, seq]."""
        long_tokens = self._long_tokens
        if long_tokens is None:
            long_tokens = self.tokens_are_long(position_ids)
        long_tokens = long_tokens.to(position_ids.device)  # a model spread over devices moves only the arguments
        angles, mscale = self.angles_and_mscale(position_ids, long_tokens)
        emb = torch.cat((angles, angles), dim=-1)
        mscale = mscale[..., None]  # [batch, seq, 1]
        if self.n_hat_mscale == "short" and self.n_hat > 0:
            mscale = torch.where(position_ids[..., None] < self.n_hat, self.short_mscale, mscale)
        cos = emb.cos() * mscale
        sin = emb.sin() * mscale
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    @contextmanager
    def factor_sets(self, long_tokens: torch.Tensor | None):
        """Inside: each token uses the set `long_tokens` gives it ([batch, seq] or [batch, 1] per row; True: long),
        whatever its positions say (None: as they say)."""
        before, self._long_tokens = self._long_tokens, long_tokens
        try:
            yield
        finally:
            self._long_tokens = before


def _init_longrope_weights(model: LlamaPreTrainedModel, module: nn.Module) -> None:
    if isinstance(module, LongRoPEScaledRotaryEmbedding):
        module.reset_buffers()
    else:
        LlamaPreTrainedModel._init_weights(model, module)


@dataclass
class SeenInputs:
    """What a cache has seen, so that its prefix can be recomputed with the other factor set.

    Positions [0, E) were fed as embeddings (`inputs_embeds` [batch, E, hidden]; E = 0 when None), the
    positions after them as token ids (`input_ids` [batch, length - E]); `attention_mask` [batch, length]
    (None: every token attended) and `position_ids` [batch, length].
    """

    inputs_embeds: torch.Tensor | None
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor

    @property
    def embedded(self) -> int:
        return 0 if self.inputs_embeds is None else self.inputs_embeds.shape[1]

    def prefix(self, length: int) -> "SeenInputs":
        embedded = min(self.embedded, length)
        return SeenInputs(
            inputs_embeds=None if self.inputs_embeds is None else self.inputs_embeds[:, :embedded],
            input_ids=self.input_ids[:, : length - embedded],
            attention_mask=None if self.attention_mask is None else self.attention_mask[:, :length],
            position_ids=self.position_ids[:, :length],
        )

    def rows(self, rows: torch.Tensor) -> "SeenInputs":
        return SeenInputs(
            inputs_embeds=None if self.inputs_embeds is None else self.inputs_embeds[rows],
            input_ids=self.input_ids[rows],
            attention_mask=None if self.attention_mask is None else self.attention_mask[rows],
            position_ids=self.position_ids[rows],
        )


def _recorded_prefix(cache: Cache | None, past_length: int, step_positions: torch.Tensor) -> SeenInputs | None:
    """What this model recorded on `cache` about its first `past_length` positions (None: unknown)."""
    if past_length == 0:
        empty = step_positions[:, :0]
        return SeenInputs(None, empty, None, empty)
    recorded = getattr(cache, "_longrope_seen", None)
    if recorded is None or recorded.position_ids.shape[0] != step_positions.shape[0]:
        return None
    if recorded.position_ids.shape[1] < past_length:
        return None
    return recorded.prefix(past_length)  # shorter when the cache was cropped


def _positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions [batch, length] of a left-padded batch, as `generate` derives them from its 2D mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


class LongRoPELlamaModel(LlamaModel):
    """`LlamaModel` with the LongRoPE rotary embedding and a cache that follows the factor set in use."""

    # Converted checkpoints are causal-LM checkpoints; AutoModel loads the backbone and leaves the head.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config):
        super().__init__(config)
        self.rotary_emb = LongRoPEScaledRotaryEmbedding(config)

    def _init_weights(self, module):
        _init_longrope_weights(self, module)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        """`LlamaModel.forward`; before a step with a cache, the cached rows whose factor set this step changes
        are recomputed with the new set. The cache is taken as `cache` or `past_key_values` (any release)."""
        cache = kwargs.pop("cache", None)
        legacy_cache = kwargs.pop("past_key_values", None)
        cache = legacy_cache if cache is None else cache
        generated = kwargs.pop("longrope_generated", None)
        step = input_ids if input_ids is not None else inputs_embeds
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        total_length = past_length + step.shape[1]
        if (position_ids is None and attention_mask is not None and attention_mask.dim() == 2
                and attention_mask.shape[-1] == total_length
                and total_length > self.rotary_emb.original_max_position_embeddings
                and not bool(attention_mask.all())):
            # A padded batch longer than the window, without positions: count each row's own tokens (as
            # generate() does), so each row picks its factor set, and n_hat, from its own length. Within the
            # window stock's positions are kept: there every row is short either way, bit for bit stock.
            position_ids = _positions_from_mask(attention_mask)[:, past_length:]
        step_positions = position_ids
        if step_positions is None:  # as the parent makes them
            step_positions = torch.arange(step.shape[1], device=step.device)[None] + past_length
        step_positions = step_positions.view(-1, step.shape[1]).expand(step.shape[0], -1)

        # Everything the cache has seen before this step (None: unknown) and, after it, what it will have seen.
        # generate()'s view is right even after beam search reordered the cache; chunked prefill hands it only
        # the chunk, and then the cache's own record serves.
        seen = None if generated is None else self._seen_in_generate(*generated, length=past_length + step.shape[1])
        seen_before = _recorded_prefix(cache, past_length, step_positions) if seen is None else seen.prefix(past_length)
        new_long = self.rotary_emb.rows_are_long(step_positions)
        packed = False  # whether a row holds several documents (a 0-dim tensor: no device sync until needed)
        if attention_mask is None and step.shape[1] > 1:
            # Positions may restart inside a row (packed documents), which transformers then keeps apart (its mask
            # when no cache is used, flash attention's varlen path), so each picks its own factor set, as alone.
            # With a mask transformers attends across restarts, and one token is one document: a row is one.
            documents = document_index(step_positions)
            long_tokens = self.rotary_emb.tokens_are_long(step_positions, documents)
            packed = (documents[:, -1] > 0).any()
        else:
            long_tokens = new_long[:, None]
        if past_length > 0:
            if bool(packed) or bool(getattr(cache, "_longrope_packed", False)):
                raise ValueError(
                    "LongRoPE: packed documents (position_ids restarting inside a row) cannot be continued from a "
                    "cache: transformers keeps them apart only in a forward without cache, which this step would "
                    "then not equal. Run packed rows with use_cache=False, or one document per row.")
            self._keep_cache_on_one_factor_set(cache, new_long, step_positions, past_length, seen_before)

        with self.rotary_emb.factor_sets(long_tokens):
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                **{CACHE_KEYWORD: cache},
                **kwargs,
            )
        returned = getattr(outputs, CACHE_KEYWORD, None)
        if returned is not None:  # what the next step needs, should it switch sets
            if seen is None and seen_before is not None:
                seen = self._then(seen_before, input_ids, inputs_embeds, attention_mask, step_positions)
            returned._longrope_seen = seen
            returned._longrope_long_rows = new_long
            returned._longrope_packed = packed
        return outputs

    def _then(self, seen: SeenInputs, input_ids, inputs_embeds, attention_mask, position_ids) -> SeenInputs:
        """`seen` followed by this step's inputs (ids, or embeddings; a 2D mask over everything, if given)."""
        positions = torch.cat((seen.position_ids, position_ids), dim=1)
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        mask = mask if mask is not None and mask.shape[1] == positions.shape[1] else None
        if input_ids is not None:
            return SeenInputs(seen.inputs_embeds, torch.cat((seen.input_ids, input_ids), dim=1), mask, positions)
        # This step fed embeddings: everything before it is kept as embeddings too.
        before = self.embed_tokens(seen.input_ids)
        if seen.inputs_embeds is not None:
            before = torch.cat((seen.inputs_embeds, before), dim=1)
        return SeenInputs(torch.cat((before, inputs_embeds), dim=1), position_ids[:, :0], mask, positions)

    @staticmethod
    def _seen_in_generate(input_ids, inputs_embeds, attention_mask, position_ids, length: int) -> SeenInputs | None:
        """What `generate` has fed so far ([batch, length] in all): its prompt embeddings, if any, then the ids
        (right-aligned: the last id is the latest position). Positions as `generate` made them."""
        embedded = 0 if inputs_embeds is None else min(inputs_embeds.shape[1], length)
        first_id = length - input_ids.shape[1]  # the position of input_ids[:, 0]
        if first_id > embedded:
            return None
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        mask = mask if mask is not None and mask.shape[1] == length else None
        if position_ids is None or position_ids.shape[-1] != length:
            position_ids = _positions_from_mask(mask) if mask is not None else torch.arange(length, device=input_ids.device)
        return SeenInputs(
            inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, :embedded],
            input_ids=input_ids[:, embedded - first_id :],
            attention_mask=mask,
            position_ids=position_ids.view(-1, length).expand(input_ids.shape[0], -1),
        )

    def _keep_cache_on_one_factor_set(self, cache: Cache, new_long, position_ids, past_length: int, seen) -> None:
        """Before a step with cache: rebuild the cached rows whose factor set this step changes."""
        cached_long = getattr(cache, "_longrope_long_rows", None)
        if cached_long is None or cached_long.shape != new_long.shape:
            # A cache this model did not fill (or re-batched): the rows' lengths tell the set used.
            cached_long = position_ids[:, 0] > self.rotary_emb.original_max_position_embeddings
        switch = new_long != cached_long.to(new_long.device)
        if bool(switch.any()):
            self._rebuild_cache_rows(cache, switch.nonzero().flatten(), new_long, past_length, seen)

    def _rebuild_cache_rows(self, cache: Cache, rows, new_long, past_length: int, seen: SeenInputs | None) -> None:
        """Recompute keys and values of the cached prefix of `rows` with their new factor set."""
        if seen is None:
            raise RuntimeError(
                "LongRoPE: this step crosses the original context window, so the cached prefix must be recomputed "
                "with the other factor set, but its inputs are unknown (a cache this model did not fill). Use "
                "generate(), pass the cache this model returned, or run without cache."
            )
        layers = _rebuildable_layers(cache)
        prefix = seen.prefix(past_length).rows(rows.to(seen.position_ids.device))
        inputs_embeds = None
        if prefix.inputs_embeds is not None:
            inputs_embeds = torch.cat((prefix.inputs_embeds, self.embed_tokens(prefix.input_ids)), dim=1)
        fresh = DynamicCache(config=self.config)
        with self.rotary_emb.factor_sets(new_long[rows][:, None]):
            super().forward(
                input_ids=prefix.input_ids if inputs_embeds is None else None,
                inputs_embeds=inputs_embeds,
                attention_mask=prefix.attention_mask,
                position_ids=prefix.position_ids,
                use_cache=True,
                **{CACHE_KEYWORD: fresh},
            )
        for layer, rebuilt in zip(layers, fresh.layers):
            layer_rows = rows.to(layer.keys.device)
            layer.keys[layer_rows, :, :past_length] = rebuilt.keys.to(layer.keys.device)
            layer.values[layer_rows, :, :past_length] = rebuilt.values.to(layer.values.device)


def _rebuildable_layers(cache: Cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) not in (DynamicLayer, StaticLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise NotImplementedError(
            f"LongRoPE: generation crossed the original context window with a cache of {kinds}; switching factor "
            "sets is supported for DynamicCache and StaticCache. Use one of those, or generate without cache."
        )
    return layers


class LongRoPELlamaForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` whose backbone is `LongRoPELlamaModel`."""

    def __init__(self, config):
        # LlamaForCausalLM.__init__ would build a stock LlamaModel first; build ours directly instead.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LongRoPELlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        _init_longrope_weights(self, module)

    def prepare_inputs_for_generation(self, input_ids, *, inputs_embeds=None, **kwargs):
        """Also hand the model everything generated so far (prompt embeddings, ids, 2D mask, positions), in case
        a step must rebuild the cache. `inputs_embeds` is named so that generate() accepts prompt embeddings."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        model_inputs["longrope_generated"] = (
            input_ids, inputs_embeds, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        return model_inputs


__all__ = ["LongRoPELlamaModel", "LongRoPELlamaForCausalLM", "LongRoPEScaledRotaryEmbedding"]
