"""LongRoPE for Llama: rotary embeddings with searched per-dimension factors.

This file is copied verbatim into every checkpoint that longrope-convert writes and is loaded with
`trust_remote_code=True`, so it imports only torch and transformers. The search and the evaluation in
the longrope-convert package import the same file: there is one implementation of the math.

LongRoPE (arXiv 2402.13753) rescales each rotary frequency with its own factor and keeps the first
n_hat positions un-interpolated. For head dimension d, base b and i = 0 .. d/2 - 1:

    theta_i          = b^(-2i/d)                        (the source model's frequencies)
    angle_i(p)       = p * theta_i                      if p < n_hat
                     = p * theta_i / lambda_i           otherwise
    cos, sin         = mscale * cos(angle), mscale * sin(angle)

Two factor sets are kept: `short` for sequences that fit the original window and `long` for longer
ones, each with its own mscale. A row of a batch is "long" once its largest position reaches the
original window (max(position) + 1 > original_max_position_embeddings), the same rule as the built-in
`longrope` type, but decided per row so that a row's output never depends on its batch-mates.
Defaults: short factors 1.0 with mscale 1.0 (short inputs give exactly the source model), long mscale
sqrt(1 + ln(s) / ln(original_max_position_embeddings)) with s = target / original.

When cached generation crosses the original window, the cache holds keys and values computed with
the short set. Re-rotating the cached keys by the difference of angles is exact for the first layer
only: every deeper layer's keys and values came from hidden states that attended with the short set.
So `LongRoPELlamaModel` recomputes the cache of the rows that switch, once, with the long set (a
prefill of the prefix), and cached generation then equals a full recompute without cache. The same
happens in reverse when a cache is cropped back into the window (assisted decoding). Supported for
`DynamicCache` and `StaticCache`; other cache layouts raise a clear error when a switch is needed.
`generate` hands the model the whole sequence so far; manual loops that pass only new tokens work
too, since the model records the tokens it has seen on the cache.

Config: the standard `rope_scaling` (read by transformers as `rope_parameters`) with
`rope_type: "longrope"`, `long_factor`, `short_factor`, `original_max_position_embeddings`, `factor`
and `attention_factor` (the long mscale), plus a top-level `longrope` dict with `n_hat` and
`short_mscale`, which stock transformers ignores.
"""

import math
from contextlib import contextmanager

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticLayer
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

def default_long_mscale(scale: float, original_max_position_embeddings: int) -> float:
    """Attention scale for the long factor set: sqrt(1 + ln(s) / ln(L)), 1.0 when s <= 1."""
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_position_embeddings))


def rope_inv_freq(base: float, dim: int, factors: torch.Tensor | None = None) -> torch.Tensor:
    """inv_freq_i = 1 / (lambda_i * base^(2i/d)), computed in float32 exactly as transformers' default RoPE."""
    wavelength_over_2pi = base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim)
    if factors is None:
        return 1.0 / wavelength_over_2pi
    return 1.0 / (torch.as_tensor(factors, dtype=torch.float) * wavelength_over_2pi)


def rotary_angles(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, original_inv_freq: torch.Tensor, n_hat: int
) -> torch.Tensor:
    """Angles [batch, seq, d/2] in float32: p * inv_freq, with the source's angles at positions < n_hat.

    `inv_freq` is [d/2] or one row per batch element [batch, d/2].
    """
    positions = position_ids[..., None].float()
    if inv_freq.dim() == 2:
        inv_freq = inv_freq[:, None, :]
    angles = positions * inv_freq
    if n_hat > 0:
        angles = torch.where(positions < n_hat, positions * original_inv_freq, angles)
    return angles


class LongRoPEScaledRotaryEmbedding(nn.Module):
    """Rotary embedding with short/long per-dimension factors, n_hat and per-set attention scales."""

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
        self.short_factor = [float(x) for x in rope["short_factor"]]
        self.long_factor = [float(x) for x in rope["long_factor"]]
        if len(self.short_factor) != self.dim // 2 or len(self.long_factor) != self.dim // 2:
            raise ValueError(
                f"LongRoPE factors must have head_dim/2 = {self.dim // 2} entries, got "
                f"{len(self.short_factor)} short and {len(self.long_factor)} long"
            )
        half = self.dim // 2
        self.original_inv_freq = nn.Buffer(torch.empty(half, device=device), persistent=False)
        self.short_inv_freq = nn.Buffer(torch.empty(half, device=device), persistent=False)
        self.long_inv_freq = nn.Buffer(torch.empty(half, device=device), persistent=False)
        self._forced_long_rows = None
        if self.original_inv_freq.device.type != "meta":
            self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the frequency buffers from the factor lists (also after loading on the meta device)."""
        init.copy_(self.original_inv_freq, rope_inv_freq(self.base, self.dim))
        init.copy_(self.short_inv_freq, rope_inv_freq(self.base, self.dim, self.short_factor))
        init.copy_(self.long_inv_freq, rope_inv_freq(self.base, self.dim, self.long_factor))

    @torch.no_grad()
    def set_factors(
        self,
        long_factor=None,
        short_factor=None,
        n_hat: int | None = None,
        long_mscale: float | None = None,
        short_mscale: float | None = None,
    ) -> None:
        """Swap factors in place (no model reload): what the search does for every candidate."""
        if long_factor is not None:
            self.long_factor = [float(x) for x in long_factor]
            self.long_inv_freq.copy_(rope_inv_freq(self.base, self.dim, self.long_factor))
        if short_factor is not None:
            self.short_factor = [float(x) for x in short_factor]
            self.short_inv_freq.copy_(rope_inv_freq(self.base, self.dim, self.short_factor))
        if n_hat is not None:
            self.n_hat = int(n_hat)
        if long_mscale is not None:
            self.long_mscale = float(long_mscale)
        if short_mscale is not None:
            self.short_mscale = float(short_mscale)

    def rows_are_long(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[batch] bool: a row uses the long set once its largest position is beyond the original window."""
        return position_ids.amax(dim=-1) + 1 > self.original_max_position_embeddings

    def angles_and_mscale(self, position_ids: torch.Tensor, long_rows: torch.Tensor):
        """Per-row angles [batch, seq, d/2] and mscale [batch] for the given choice of factor set."""
        inv_freq = torch.where(long_rows[:, None], self.long_inv_freq, self.short_inv_freq)
        angles = rotary_angles(position_ids, inv_freq, self.original_inv_freq, self.n_hat)
        mscale = torch.where(long_rows, self.long_mscale, self.short_mscale).to(torch.float)
        return angles, mscale

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        long_rows = self._forced_long_rows
        if long_rows is None:
            long_rows = self.rows_are_long(position_ids)
        angles, mscale = self.angles_and_mscale(position_ids, long_rows)
        emb = torch.cat((angles, angles), dim=-1)
        cos = emb.cos() * mscale[:, None, None]
        sin = emb.sin() * mscale[:, None, None]
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    @contextmanager
    def forced_factor_set(self, long_rows: torch.Tensor):
        """Use the given factor set per row, whatever the positions say (to rebuild a cache)."""
        self._forced_long_rows = long_rows
        try:
            yield
        finally:
            self._forced_long_rows = None


def _init_longrope_weights(model: LlamaPreTrainedModel, module: nn.Module) -> None:
    if isinstance(module, LongRoPEScaledRotaryEmbedding):
        module.reset_buffers()
    else:
        LlamaPreTrainedModel._init_weights(model, module)


def _record_history(cache: Cache, input_ids, attention_mask, position_ids, past_length: int):
    """Tokens, 2D mask and positions of everything the cache has seen, kept on the cache for manual loops."""
    seen = getattr(cache, "_longrope_seen", None)
    unknown = input_ids is None or (
        past_length > 0 and (seen is None or seen[0].shape[0] != input_ids.shape[0] or seen[0].shape[1] < past_length)
    )
    if unknown:
        cache._longrope_seen = None
        return None
    if past_length > 0:  # a cropped cache keeps the start of what it saw
        input_ids = torch.cat((seen[0][:, :past_length], input_ids), dim=1)
        position_ids = torch.cat((seen[2][:, :past_length], position_ids), dim=1)
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    cache._longrope_seen = (input_ids, mask, position_ids)
    return cache._longrope_seen


class LongRoPELlamaModel(LlamaModel):
    """`LlamaModel` with the LongRoPE rotary embedding and a cache that follows the factor set in use."""

    # Converted checkpoints are causal-LM checkpoints; AutoModel loads the backbone and leaves the head.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config):
        super().__init__(config)
        self.rotary_emb = LongRoPEScaledRotaryEmbedding(config)

    def _init_weights(self, module):
        _init_longrope_weights(self, module)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        history = kwargs.pop("longrope_history", None)
        if cache is not None:
            new_tokens = input_ids if input_ids is not None else inputs_embeds
            if position_ids is None:
                position_ids = torch.arange(new_tokens.shape[1], device=new_tokens.device) + cache.get_seq_length()
            position_ids = position_ids.view(-1, new_tokens.shape[1]).expand(new_tokens.shape[0], -1)
            self._keep_cache_on_one_factor_set(cache, input_ids, attention_mask, position_ids, history)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )

    def _keep_cache_on_one_factor_set(self, cache: Cache, input_ids, attention_mask, position_ids, history) -> None:
        """Before a step with cache: rebuild the cached rows whose factor set this step changes."""
        past_length = int(cache.get_seq_length())
        recorded = _record_history(cache, input_ids, attention_mask, position_ids, past_length)
        history = history if history is not None else recorded
        new_long = self.rotary_emb.rows_are_long(position_ids)
        if past_length > 0:
            cached_long = getattr(cache, "_longrope_long_rows", None)
            if cached_long is None or cached_long.shape != new_long.shape:
                # A cache this model did not fill (or re-batched): the rows' lengths tell the set used.
                cached_long = position_ids[:, 0] > self.rotary_emb.original_max_position_embeddings
            switch = new_long != cached_long.to(new_long.device)
            if bool(switch.any()):
                self._rebuild_cache_rows(cache, switch.nonzero().flatten(), new_long, past_length, history)
        cache._longrope_long_rows = new_long

    def _rebuild_cache_rows(self, cache: Cache, rows, new_long, past_length: int, history) -> None:
        """Recompute keys and values of the cached prefix of `rows` with their new factor set."""
        if history is None or history[0] is None or history[0].shape[1] < past_length:
            raise RuntimeError(
                "LongRoPE: this step crosses the original context window, so the cached prefix must be recomputed "
                "with the other factor set, but its tokens are unknown (cache filled from inputs_embeds or "
                "elsewhere). Use generate(), feed the whole sequence, or run without cache."
            )
        layers = _rebuildable_layers(cache)
        ids, mask, positions = history
        device = ids.device
        rows = rows.to(device)
        prefix_positions = positions[rows, :past_length] if positions is not None else None
        prefix_mask = mask[rows, :past_length] if mask is not None and mask.dim() == 2 else None
        fresh = DynamicCache(config=self.config)
        with self.rotary_emb.forced_factor_set(new_long[rows]):
            super().forward(
                input_ids=ids[rows, :past_length],
                attention_mask=prefix_mask,
                position_ids=prefix_positions,
                cache=fresh,
                use_cache=True,
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

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """Also hand the model the whole sequence so far, in case a step must rebuild the cache."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        mask = kwargs.get("attention_mask")
        model_inputs["longrope_history"] = (
            input_ids,
            mask if mask is not None and mask.dim() == 2 else None,
            kwargs.get("position_ids"),
        )
        return model_inputs


__all__ = ["LongRoPELlamaModel", "LongRoPELlamaForCausalLM", "LongRoPEScaledRotaryEmbedding"]
