"""llama.cpp for the tests, through llama-cpp-python, and Llama GGUF files written from safetensors.

llama-cpp-python ships as an sdist that compiles llama.cpp (about 6 minutes on 2 cores). It is built
once into a wheel kept in the test cache (`LONGROPE_TEST_CACHE`) and installed from it with
`--target` into a folder there, which the tests put on sys.path: later runs, CI's fresh
virtualenvs included, import it without compiling. The build targets this machine's CPU
(llama.cpp's default -march=native): the cache belongs to the machine that filled it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from model_cache import cache_dir

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e57098
# Its one runtime dependency that torch and transformers do not already bring.
EXTRA_DEPENDENCIES = ("diskcache==5.6.3",)
GGML_LOG_LEVEL_ERROR = 4


def llama_cpp_module():
    """The `llama_cpp` package (low-level API), built and installed into the test cache on first use."""
    version = LLAMA_CPP_PYTHON.split("==")[1]
    installed = cache_dir() / f"llama-cpp-python-{version}"
    if not (installed / "llama_cpp" / "__init__.py").is_file():
        wheels = cache_dir() / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        if not list(wheels.glob(f"llama_cpp_python-{version}-*.whl")):
            # The llava/mtmd library is not needed: text only.
            env = {**os.environ, "CMAKE_ARGS": "-DLLAVA_BUILD=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())}
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary",
                            "llama-cpp-python", LLAMA_CPP_PYTHON, "--wheel-dir", str(wheels)], check=True, env=env)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
            wheel = next(wheels.glob(f"llama_cpp_python-{version}-*.whl"))
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                            f"{work}/site", str(wheel), *EXTRA_DEPENDENCIES], check=True)
            os.replace(f"{work}/site", installed)
    if str(installed) not in sys.path:
        sys.path.insert(0, str(installed))
    import llama_cpp

    return llama_cpp


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _errors_only(level, text, user_data):
    if level >= GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode(errors="replace"))


def llama_cpp_forward(path: Path, ids: list[int], logits_at: range = range(0), batch_size: int = 512,
                      n_ctx: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run llama.cpp over `ids` (one sequence) in a context of `n_ctx` tokens (`-c`; default len(ids)) with
    its default settings (F16 K/V cache, flash attention as it picks on CPU), as llama-cli or
    llama-perplexity would.

    Returns the NLL of tokens 1 .. n-1 [n-1] (float64) and the logits at positions `logits_at`
    [len(logits_at), vocab] (float32).
    """
    lc = llama_cpp_module()
    lc.llama_log_set(ctypes.cast(_errors_only, lc.llama_log_callback), ctypes.c_void_p(0))
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    params = lc.llama_context_default_params()
    params.n_ctx = n_ctx or len(ids)
    params.n_batch = params.n_ubatch = batch_size
    params.n_threads = params.n_threads_batch = os.cpu_count()
    context = lc.llama_init_from_model(model, params)
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(batch_size, 0, 1)
    nll = np.empty(len(ids) - 1)
    kept = np.empty((len(logits_at), vocab), dtype=np.float32)
    try:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, True
                batch.seq_id[i][0] = 0
            if lc.llama_decode(context, batch) != 0:
                raise RuntimeError(f"llama_decode failed at position {start}")
            logits = np.ctypeslib.as_array(lc.llama_get_logits(context), shape=(len(chunk), vocab))
            positions = np.arange(start, start + len(chunk))
            top = logits.max(axis=1, keepdims=True).astype(np.float64)
            log_normaliser = (np.log(np.exp(logits - top).sum(axis=1, keepdims=True)) + top)[:, 0]
            scored = positions < len(ids) - 1
            nll[positions[scored]] = log_normaliser[scored] - logits[scored, np.asarray(ids)[positions[scored] + 1]]
            first, last = max(start, logits_at.start), min(start + len(chunk), logits_at.stop)
            if first < last:
                kept[first - logits_at.start:last - logits_at.start] = logits[first - start:last - start]
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(context)
        lc.llama_model_free(model)
    return nll, kept


def baseline_nll(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's NLL of `ids` under a GGUF the tests never modify (a downloaded one), measured once
    and kept in the test cache under the SHA-256 of the file and of the tokens and the llama-cpp-python
    version: the baseline that the files the tests write are compared with, without paying a second
    long llama.cpp run each time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    digest.update(LLAMA_CPP_PYTHON.encode())
    cached = cache_dir() / "llama-cpp-baselines" / f"{digest.hexdigest()[:32]}.npy"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        nll, _ = llama_cpp_forward(path, ids)
        with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".npy", delete=False) as partial:
            np.save(partial, nll)
        os.replace(partial.name, cached)
    return np.load(cached)


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q/K rows reordered from transformers' rotate-half layout to llama.cpp's interleaved pairs, as
    llama.cpp's converter does (conversion/llama.py:176, LlamaModel.permute)."""
    rows_per_half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows_per_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(folder: Path, path: Path, context_length: int, rope_freqs: list[float] | None = None) -> None:
    """An F32 GGUF of the Llama checkpoint in `folder` (no tokenizer: llama.cpp's 'none' vocabulary),
    with `rope_freqs` as a Llama 3.1 GGUF carries its llama3 factors."""
    import json

    config = json.loads((folder / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(context_length)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("none")
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name.endswith("q_proj.weight"):
            tensor = permute_for_llama_cpp(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_for_llama_cpp(tensor, kv_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def by_context_gguf(export: Path, long_factor: list[float], short_factor: list[float], output: Path) -> None:
    """An extended GGUF (`longrope-convert gguf`: the long set as rope_freqs) rewritten as llama.cpp's own
    `longrope` type: scaling type "longrope" and `rope_factors_long` / `rope_factors_short`, which llama.cpp's Llama
    loader creates instead of rope_freqs and picks by the allocated context (longrope_convert/gguf.py says where).
    Not something the tool writes: it loses on short inputs (BENCHMARKS.md, llama.cpp by context size)."""
    reader = gguf.GGUFReader(export)
    writer = gguf.GGUFWriter(output, "llama")
    for name, entry in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = "longrope" if name == "llama.rope.scaling.type" else entry.contents()
        writer.add_key_value(name, value, entry.types[0], sub_type=entry.types[-1] if len(entry.types) > 1 else None)
    writer.add_tensor("rope_factors_long.weight", np.asarray(long_factor, dtype=np.float32))
    writer.add_tensor("rope_factors_short.weight", np.asarray(short_factor, dtype=np.float32))
    for tensor in reader.tensors:
        if tensor.name != "rope_freqs.weight":
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
