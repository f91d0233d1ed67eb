"""Perplexity: documents as token ids, and the negative log-likelihood computed in chunks.

One implementation for the search's fitness, the evaluation and the tests. The model's hidden
states are computed once; the LM head and the loss run over chunks of positions, so memory is
O(length x hidden), never O(length x vocab).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def document_ids(tokenizer, text: str, length: int | None = None) -> torch.Tensor:
    """[1, n] token ids: BOS, then the text's first tokens (all of them, or length - 1)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if length is not None:
        ids = ids[:length]
    return torch.tensor([ids], dtype=torch.long)


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Negative log-likelihood of tokens 1 .. n-1 of each row, [batch, n-1] float32.

    `model` is a causal LM with `.model` (the backbone) and `.lm_head`, as Llama has.
    """
    input_ids = input_ids.to(model.device)
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = input_ids[:, 1:]
    nll = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[1], chunk_size):
        end = min(start + chunk_size, targets.shape[1])
        logits = model.lm_head(hidden[:, start:end]).float()
        nll[:, start:end] = F.cross_entropy(logits.transpose(1, 2), targets[:, start:end], reduction="none")
    return nll


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL) over all the tokens given."""
    return math.exp(nll.double().mean().item())
