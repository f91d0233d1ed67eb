"""Hub kernels (the `kernels` package): what they replace in a Llama, and that neither our loads nor our rotary math
depend on them.

transformers 5.25 turns Hub kernels on by default in `from_pretrained` (modeling_utils.py, `use_kernels is None`
-> True). For a Llama the kernel mapping (integrations/hub_kernels.py, `_build_kernel_mapping`) replaces
`apply_rotary_pos_emb(q, k, cos, sin)` (modeling_llama.py: `@use_kernel_func_from_hub("rotary_pos_emb")`, used by
`LlamaAttention` through `@use_kernelized_func`) with kernels-community/rotary's `apply_rotary_transformers` on CUDA
and XPU (aiter-rope on ROCm), and RMSNorm with liger-kernels' on CUDA/ROCm. The rotary embedding module that makes
cos and sin, ours, is not replaced: the kernel receives our cos and sin, and uses their first half
(`cos[..., :head_dim // 2]`; ours is `cat(angles, angles) * mscale`, so the halves are equal). n_hat, the short/long
switch and the attention scales are all in cos and sin, so they apply with kernels on.

The mapping has no CPU entry, so here a CPU kernel with the same contract is registered the same way
(`kernels.use_kernel_mapping`) and the real mechanism (`from_pretrained(use_kernels=True)` -> `kernelize`) runs.
These tests also run under the oldest supported release and one in the middle (test_transformers_releases.py).
"""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils import is_kernels_available

from conftest import TINY_WINDOW
from longrope_convert.convert import longrope_config, write_checkpoint
from longrope_convert.perplexity import load_longrope_model
from longrope_convert.source import read_source
from longrope_models import tiny_factor_set

kernels = pytest.importorskip("kernels")


KERNEL_CALLS = []  # one entry per call of the kernel below (kernels allows a kernel class no extra members)


class HalfRotaryKernel(nn.Module):
    """A CPU stand-in for kernels-community/rotary's `apply_rotary_transformers`: the same signature, and like it
    rotates with the first half of cos and sin only."""

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        KERNEL_CALLS.append(cos.shape)
        half = q.shape[-1] // 2
        cos, sin = cos.unsqueeze(unsqueeze_dim)[..., :half], sin.unsqueeze(unsqueeze_dim)[..., :half]

        def rotate(x):
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

        return rotate(q), rotate(k)


class LocalKernel:
    """A kernel repository (kernels' RepositoryProtocol: `load()` gives the layer class) without the Hub."""

    def load(self):
        return HalfRotaryKernel


@pytest.fixture
def cpu_rotary_kernel():
    """The rotary kernel mapped for the CPU, as transformers maps kernels-community/rotary for CUDA. Yields its
    calls and a list to put kernelized models in: they are restored to the torch functions afterwards, since up
    to transformers 5.12 the kernelized function is one module shared by every model in the process."""
    mapping = {"rotary_pos_emb": {"cpu": {kernels.Mode.INFERENCE: LocalKernel()}}}
    KERNEL_CALLS.clear()
    kernelized = []
    with kernels.use_kernel_mapping(mapping):
        yield KERNEL_CALLS, kernelized
    with kernels.use_kernel_mapping({}, inherit_mapping=False):
        for model in kernelized:
            kernels.kernelize(model, mode=kernels.Mode.INFERENCE, device="cpu")


@pytest.fixture(scope="module")
def converted(tiny_llama_dir, tmp_path_factory):
    """The tiny model converted to 4x its window with n_hat 4."""
    output = tmp_path_factory.mktemp("kernels") / "tiny-longrope"
    write_checkpoint(read_source(tiny_llama_dir), tiny_factor_set(tiny_llama_dir, n_hat=4), output, "test")
    return output


@pytest.mark.skipif(not is_kernels_available(), reason="use_kernels=True needs the kernels release this transformers "
                    "release pins (5.17: 0.16.x, whose dependencies are not installed beside it here), not the one "
                    "installed")
@torch.no_grad()
def test_a_hub_rotary_kernel_applies_our_cos_and_sin(converted, cpu_rotary_kernel):
    """With kernels on, the replaced rotary application gets our cos/sin: n_hat, the long set beyond the window and
    the short set inside it give the same logits as without kernels."""
    calls, kernelized = cpu_rotary_kernel
    with_kernels = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, use_kernels=True).eval()
    kernelized.append(with_kernels)
    without = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, use_kernels=False).eval()
    torch.manual_seed(0)
    for length in (TINY_WINDOW, 3 * TINY_WINDOW):  # short set; long set with n_hat
        ids = torch.randint(3, 256, (2, length))
        before = len(calls)
        torch.testing.assert_close(with_kernels(ids).logits, without(ids).logits, rtol=1e-5, atol=1e-5)
        assert len(calls) > before, "the kernel was not used: this test would prove nothing"


@torch.no_grad()
def test_package_loads_never_use_hub_kernels(tiny_llama_dir, cpu_rotary_kernel):
    """The search and evaluation score candidates with the rotary application users run by default on every
    release, and never fetch a kernel from the Hub (a GPU without network would fail)."""
    config = longrope_config(json.loads((tiny_llama_dir / "config.json").read_text()), tiny_factor_set(tiny_llama_dir))
    model = load_longrope_model(tiny_llama_dir, config)
    calls, _ = cpu_rotary_kernel
    model(torch.randint(3, 256, (1, 3 * TINY_WINDOW)))
    assert calls == []
