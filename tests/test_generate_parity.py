"""generate() with the shipped modeling code, mode by mode: inside the window the same output as stock
transformers on the source (sequences, scores and logits, bit for bit); across it the same as generating
without cache (the cache is rebuilt when a row switches factor sets).

These tests also run under the oldest supported transformers release and one in the middle
(test_transformers_releases.py).
"""

import pytest
import torch

from conftest import TINY_WINDOW
from longrope_models import left_padded, longrope_pair, relative_error

NEW_TOKENS = 8
# name: (generate() arguments, batch size). Assisted decoding and prompt lookup take one sequence at a time.
MODES = {
    "greedy": (dict(do_sample=False), 2),
    "seeded sampling": (dict(do_sample=True, top_k=20, temperature=0.8), 2),
    "beam search": (dict(do_sample=False, num_beams=3, num_return_sequences=2), 2),
    "prompt lookup": (dict(do_sample=False, prompt_lookup_num_tokens=4, max_matching_ngram_size=2), 1),
    "assisted": (dict(do_sample=False, num_assistant_tokens=3), 1),
    "static cache": (dict(do_sample=False, cache_implementation="static"), 2),
    "chunked prefill": (dict(do_sample=False, prefill_chunk_size=16), 2),
}


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    source, model, _ = longrope_pair(tiny_llama_dir, n_hat=4)
    return source, model


def prompts(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts, the last row left-padded by 5. A single prompt repeats its first half, so that prompt
    lookup finds candidates (and has some of them rejected: the cache is cropped)."""
    ids, mask = left_padded(batch, length, padding=5 if batch > 1 else 0, seed=length)
    if batch == 1:
        half = length // 2
        ids[:, half : 2 * half] = ids[:, :half]
    return ids, mask


def generate(model, ids, mask, arguments, assistant=None, **overrides):
    torch.manual_seed(0)
    if "num_assistant_tokens" in arguments:
        overrides["assistant_model"] = assistant
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          return_dict_in_generate=True, output_scores=True, output_logits=True, pad_token_id=0,
                          **arguments, **overrides)


def assert_same(actual, expected) -> None:
    assert torch.equal(actual.sequences, expected.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(actual, name)) == len(getattr(expected, name)) == NEW_TOKENS
        for step, (a, e) in enumerate(zip(getattr(actual, name), getattr(expected, name))):
            assert torch.equal(a, e), (name, step)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_inside_the_window_generate_equals_stock_transformers_on_the_source(models, mode):
    source, model = models
    arguments, batch = MODES[mode]
    ids, mask = prompts(batch, TINY_WINDOW - NEW_TOKENS - 4)
    ours = generate(model, ids, mask, arguments, assistant=source)
    stock = generate(source, ids, mask, arguments, assistant=source)
    assert_same(ours, stock)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_across_the_window_every_cached_step_equals_a_forward_without_cache(models, mode):
    """Each forward that generate() makes with the cache gives the logits of a forward of the whole sequence so
    far without cache. (Assisted decoding and prompt lookup score several candidates in one forward: when it
    crosses the window, all of them get the long set, as they would without cache, and as stock longrope does.)"""
    source, model = models
    arguments, batch = MODES[mode]
    ids, mask = prompts(batch, TINY_WINDOW - NEW_TOKENS // 2)  # crosses the window half way
    steps = []

    def record(module, args, kwargs, out):
        sequence, _, sequence_mask, _ = kwargs["longrope_generated"]
        steps.append((sequence, sequence_mask, out.logits.clone()))  # generate() may process them in place

    hook = model.register_forward_hook(record, with_kwargs=True)
    try:
        generate(model, ids, mask, arguments, assistant=source)
    finally:
        hook.remove()
    assert max(sequence.shape[1] for sequence, _, _ in steps) > TINY_WINDOW
    for sequence, sequence_mask, logits in steps:
        if sequence_mask is None:
            sequence_mask = torch.ones_like(sequence)
        if sequence.shape[1] < sequence_mask.shape[1]:  # chunked prefill hands over the chunk only
            sequence = ids[:, : sequence_mask.shape[1]]
        positions = (sequence_mask.cumsum(-1) - 1).clamp(min=0)
        reference = model(sequence, attention_mask=sequence_mask, position_ids=positions, use_cache=False).logits
        assert relative_error(logits, reference[:, -logits.shape[1] :]) <= 1e-5, sequence.shape


@torch.no_grad()
def test_prompt_embeddings_generate_like_their_token_ids(models):
    """generate(inputs_embeds=...): the source's output inside the window; across it, the output of the
    same prompt as token ids without cache."""
    source, model = models
    for length, reference_model, cache in ((TINY_WINDOW - NEW_TOKENS - 4, source, True),
                                           (TINY_WINDOW - NEW_TOKENS // 2, model, False)):
        ids, mask = prompts(2, length)
        embeds = model.model.embed_tokens(ids)
        ours = generate(model, None, mask, dict(do_sample=False), inputs_embeds=embeds)
        expected = generate(reference_model, ids, mask, dict(do_sample=False), use_cache=cache)
        assert torch.equal(ours.sequences, expected.sequences[:, length:])
        for a, e in zip(ours.logits, expected.logits):
            assert torch.equal(a, e) if cache else relative_error(a, e) <= 1e-5
