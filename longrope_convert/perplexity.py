"""Perplexity: tokenized documents, a LongRoPE model whose factors can be swapped, and chunked NLL.

One implementation for the search's fitness, the evaluation and the tests. The model's hidden
states are computed once; the LM head and the loss run over chunks of positions, so memory is
O(length x hidden), never O(length x vocab).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from .documents import Document
from .errors import LongRoPEError
from .factors import FactorSet


def tokenized_documents(tokenizer, documents: Iterable[Document], length: int, limit: int | None = None,
                        windows: bool = False) -> tuple[list[torch.Tensor], list[str], int]:
    """Up to `limit` documents of at least `length` tokens, each as BOS + its first length - 1 tokens.

    Returns (token id tensors [1, length], their names, how many documents were skipped: shorter ones,
    and empty or whitespace-only ones, which are no documents at all). Iteration stops at the
    `limit`-th document kept, so a streamed dataset is read no further than needed. With `windows`, when the
    data has fewer such documents than `limit`, the long ones give more: BOS + their next length - 1 tokens
    each ("NAME#window2", ...), the documents' second windows first, then their third ones, until `limit`.
    """
    kept, names, skipped, texts = [], [], 0, []
    if limit == 0:
        return kept, names, skipped  # without pulling a document from the stream
    for document in documents:
        ids = document_ids(tokenizer, document.text, None if windows else length) if document.text.strip() else None
        if ids is None or ids.shape[1] < length:
            skipped += 1
            continue
        kept.append(ids[:, :length])
        names.append(document.name)
        if windows:  # the text's tokens after BOS, for more windows
            texts.append(ids[0, 1:] if tokenizer.bos_token_id is not None else ids[0])
        if len(kept) == limit:
            return kept, names, skipped
    step, window, sources = length - (tokenizer.bos_token_id is not None), 1, list(zip(texts, names))
    while windows and limit is not None and len(kept) < limit and any(len(t) >= (window + 1) * step for t in texts):
        for text, name in sources:
            if len(kept) < limit and len(text) >= (window + 1) * step:
                tokens = text[window * step : (window + 1) * step]
                if tokenizer.bos_token_id is not None:
                    tokens = torch.cat([torch.tensor([tokenizer.bos_token_id]), tokens])
                kept.append(tokens[None, :].to(torch.long))
                names.append(f"{name}#window{window + 1}")
        window += 1
    return kept, names, skipped


def load_longrope_model(folder: str | Path, config: dict, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, device_map: str | None = None,
                        gpus: list[int] | None = None):
    """The shipped LongRoPE model on the weights in `folder`, configured by the config dict given
    (weights in `dtype`, default bf16 on CUDA and fp32 elsewhere; the rotary math is float32 in every
    dtype; SDPA attention; no Hub kernels; eval mode).

    On `device`, or with `device_map="auto"` spread by accelerate over the GPUs in `gpus` (all
    when None), layer by layer, for models that do not fit one GPU. Raises LongRoPEError when
    device_map is asked for without accelerate installed.
    """
    from transformers import LlamaConfig

    from .modeling_longrope_llama import LongRoPELlamaForCausalLM

    device = torch.device(device)
    placement = {}
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise LongRoPEError(f"{{device_map}} {device_map} needs the accelerate package (pip install accelerate)",
                                setting="device_map", value=device_map)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        placement["device_map"] = device_map
        if gpus is not None and device.type == "cuda":  # only this process's GPUs, as their free memory allows
            placement["max_memory"] = {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in gpus}
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # use_kernels=False: transformers 5.25 defaults to Hub kernels (fetched at load: no network, no load), and
    # candidates are scored with the rotary application every release runs by default.
    model = LongRoPELlamaForCausalLM.from_pretrained(
        folder, config=LlamaConfig.from_dict(config), dtype=dtype, attn_implementation="sdpa", use_kernels=False,
        **placement)
    return (model if device_map is not None else model.to(device)).eval()


def use_factor_set(model, factor_set: FactorSet) -> None:
    """Swap a factor set into the model's rotary embedding in place. A set whose short set is the source's own
    RoPE (short_set "source") gets it back exactly, after sets with short factors replaced it; the model must
    have been loaded for that source (its config's longrope.source_rope), else ValueError."""
    rotary = model.model.rotary_emb
    source_short_set = factor_set.short_set == "source"
    rotary.set_factors(
        long_factor=factor_set.long_factor, short_factor=None if source_short_set else factor_set.short_factor,
        n_hat=factor_set.n_hat, long_mscale=factor_set.long_mscale, short_mscale=factor_set.short_mscale)
    rotary.n_hat_mscale = factor_set.n_hat_mscale
    if source_short_set:
        source_rope = factor_set.model.base_factor_set().source_rope
        if rotary.source_rope != source_rope:
            raise ValueError(f"the model was loaded for a source with RoPE {rotary.source_rope}, the factor set is "
                             f"for one with {source_rope}")
        if rotary.short_set != "source":
            rotary.short_set = "source"
            rotary.reset_buffers()


def document_ids(tokenizer, text: str, length: int | None = None) -> torch.Tensor:
    """[1, n] token ids: BOS, then the text's first tokens (all of them, or length - 1)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if length is not None:
        ids = ids[:length]
    return torch.tensor([ids], dtype=torch.long)


# Positions per chunk of logits on the CPU: the lowest peak memory at 16k for SmolLM2 at no cost in time
# (benchmarks/perplexity_memory.py; benchmarks/fitness_speed.py for the time).
CPU_LOGITS_CHUNK = 256


def logits_chunk_size(lm_head: torch.nn.Linear, positions: int) -> int:
    """Positions whose logits are computed at once: CPU_LOGITS_CHUNK on the CPU; on a GPU as many
    as half its free memory holds (logits in the model's dtype, their float32 copy and the
    log-softmax the loss makes of it: vocab x (element size + 8) bytes a position), at most all."""
    weight = lm_head.weight
    if weight.device.type != "cuda":
        return min(CPU_LOGITS_CHUNK, positions)
    free_bytes, _ = torch.cuda.mem_get_info(weight.device)
    per_position = weight.shape[0] * (weight.element_size() + 2 * 4)
    return max(1, min(positions, free_bytes // 2 // per_position))


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor, chunk_size: int | None = None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood in nats of tokens 1 .. n-1 of each row of input_ids [batch, n]: [batch, n-1] float32;
    with `positions` (token indices >= 1 of a single row), of those tokens only: [1, len(positions)].

    `model` is a causal LM with `.model` (the backbone) and `.lm_head`, as Llama has; the backbone
    runs once. The LM head and the loss then run on flat [positions, vocab] logits (the layout
    cross_entropy reads fastest; [batch, vocab, positions] costs 25x the backbone on a GPU), for
    `chunk_size` positions at a time (default: logits_chunk_size), so memory beyond the backbone's
    activations is O(chunk x vocab) and never O(length x vocab). Values equal the loss on all flat
    logits at once.
    """
    input_ids = input_ids.to(model.device)
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [batch, n, hidden]
    head = model.lm_head
    if positions is not None:  # the token at p is predicted from the hidden state at p - 1
        positions = positions.to(input_ids.device)
        hidden = hidden[0, positions - 1].to(head.weight.device)
        targets = input_ids[0, positions].to(head.weight.device)
    else:
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(head.weight.device)  # [batch x (n-1), hidden]
        targets = input_ids[:, 1:].reshape(-1).to(head.weight.device)
    chunk_size = chunk_size or logits_chunk_size(head, targets.numel())
    nll = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.numel(), chunk_size):
        logits = head(hidden[start : start + chunk_size]).float()  # [chunk, vocab]
        nll[start : start + chunk_size] = F.cross_entropy(logits, targets[start : start + chunk_size], reduction="none")
    return nll.view(1 if positions is not None else input_ids.shape[0], -1)


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL) over all the tokens given; inf when that overflows a double (mean NLL above
    ~709.78 nats), nan when an NLL is nan."""
    return torch.exp(nll.double().mean()).item()
