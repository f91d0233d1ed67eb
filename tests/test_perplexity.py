"""The NLL that search and evaluation share: values against a flat-logits reference, device placement."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from conftest import tiny_llama_config
from longrope_convert.convert import longrope_config
from longrope_convert.factors import analytic_factor_set
from longrope_convert.perplexity import CPU_LOGITS_CHUNK, load_longrope_model, logits_chunk_size, token_nll
from longrope_convert.source import read_source

LLAMA3_VOCAB = 128_256


@torch.inference_mode()
def flat_reference(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits for every position at once, flat [positions, vocab], one cross_entropy: [batch, n-1]."""
    logits = model(ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1)


def test_token_nll_equals_the_flat_reference_at_llama3_vocabulary_size():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=LLAMA3_VOCAB)).eval()
    ids = torch.randint(3, LLAMA3_VOCAB, (2, 130), generator=torch.Generator().manual_seed(1))
    reference = flat_reference(model, ids)
    for chunk_size in (None, 1, 37):  # default (256: 256 + 2 positions), one position, ragged
        nll = token_nll(model, ids, chunk_size=chunk_size)
        assert nll.shape == (2, 129) and nll.dtype == torch.float32
        torch.testing.assert_close(nll, reference, rtol=1e-6, atol=1e-6)
    assert reference.mean() > 5  # a random model: the check is not on near-zero losses


def test_logits_come_in_cpu_chunks_of_bounded_size():
    head = torch.nn.Linear(64, LLAMA3_VOCAB, bias=False)
    assert logits_chunk_size(head, 65535) == CPU_LOGITS_CHUNK
    assert logits_chunk_size(head, 10) == 10


def test_device_map_auto_on_the_cpu_gives_the_same_values(tiny_llama_dir):
    pytest.importorskip("accelerate")
    source = read_source(tiny_llama_dir)
    config = longrope_config(source.config, analytic_factor_set("yarn", source.fingerprint, 256))
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    placed = load_longrope_model(tiny_llama_dir, config, device_map="auto")
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    assert torch.equal(token_nll(placed, ids), token_nll(load_longrope_model(tiny_llama_dir, config), ids))
