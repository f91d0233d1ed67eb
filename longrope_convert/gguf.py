"""GGUF export: the extended model for llama.cpp, rewritten from a Llama GGUF file the user already has.

llama.cpp applies per-dimension RoPE factors to the Llama architecture through one optional F32
tensor, `rope_freqs.weight` [n_rot/2] (added for Llama 3.1 by llama.cpp PR #8676). Lines below are
llama.cpp 0c1e57098, the build llama-cpp-python 0.3.36 vendors and the tests run:

- src/models/llama.cpp:66 creates `rope_freqs` for every Llama whose scaling type is not longrope;
  src/llama-model.cpp:2337 `get_rope_factors` returns it before any long/short choice, so it holds
  at every position and every context size;
- ggml/src/ggml-cpu/ops.cpp:6187-6217 (`rope_yarn`, `ggml_rope_cache_init`) divides frequency i by
  rope_freqs[i] and multiplies cos and sin by the attention factor; with YaRN off:

      angle_i(p) = p * freq_base^(-2i/d) / rope_freqs[i]
      cos, sin   = attn_factor * cos(angle_i(p)), attn_factor * sin(angle_i(p))

  which is the LongRoPE remote code's long set with lambda_i = rope_freqs[i], mscale = attn_factor.

The metadata keys that make llama.cpp apply exactly that and nothing more (src/llama-model.cpp:1321,
1410-1431; src/llama-context.cpp:137, 166-175, 214):

    llama.context_length                        n_ctx_train: the target length
    llama.rope.scaling.type = "none"            rope_freq_scale forced to 1, YaRN off; when the key is
                                                absent llama.cpp assumes "linear" and reads a factor
    llama.rope.scaling.attn_factor              multiplies cos and sin: the long mscale
    llama.rope.scaling.original_context_length  the original window (read only by YaRN and longrope)

One static long set is what every llama.cpp since PR #8676 reads the same way. It differs from the
remote code: no n_hat and no short-window identity (inputs inside the original window use the long
set too); the output's metadata says so under `longrope.differences`.

Not written: llama.cpp's own `longrope` type. For a Llama of that type src/models/llama.cpp:61-67
creates `rope_factors_long` / `rope_factors_short` instead of rope_freqs, and
src/llama-model.cpp:2337-2350 picks the long set when the context's n_ctx_seq (`-c`, padded to a
multiple of 256: src/llama-context.cpp:290) exceeds the original context length, else the short set,
for every sequence: by the allocated context, not by the sequence (llama.cpp issue #24823). llama.cpp
reads it so (tests/test_gguf.py), but with one attention factor for both sets the short set does not
give back the source either, and measured it loses to the long set on short inputs (SmolLM2 16k,
8,192 tokens at -c 8192: perplexity 22.16 against 21.99; BENCHMARKS.md). llama.cpp's converter
writes no factors for a longrope Llama (conversion/base.py) and dropped longrope factors given under
`rope_parameters` (issue #24820).

Tensors are copied byte for byte (quantized ones stay as they are), by the kernel where it can
(copy_file_range) or through one bounded buffer, so memory stays flat for any file size. The output
is staged next to it and renamed at the end (outputs.atomic_file: what a killed run left is removed by
the next one).
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from . import __version__
from .convert import default_output
from .errors import LongRoPEError
from .factors import (
    ANALYTIC_METHODS,
    DEFAULT_INIT,
    FactorSet,
    ModelFingerprint,
    analytic_factor_set,
    default_init_warning,
    find_shipped_factor_set,
    load_factor_set,
)
from .fetch import download_matching
from .hub import hub_cache, looks_like_repo_id
from .outputs import atomic_file
from .source_rope import DEFAULT_ROPE

ARCHITECTURE = "llama"  # the only architecture whose graph applies rope_freqs as LongRoPE needs
ROPE_FREQS = "rope_freqs.weight"
COPY_BLOCK_BYTES = 16 * 1024 * 1024  # buffer of the fallback copy, where copy_file_range is unavailable
FACTOR_TOLERANCE = 1e-6  # rope_freqs is float32; factor files hold float64


class GGUFError(LongRoPEError):
    """A GGUF file that cannot be extended, or factors that do not fit it; the message names the file."""


@dataclass
class GGUFModel:
    """A Llama GGUF file and its RoPE as llama.cpp applies it.

    `fingerprint.original_max_position_embeddings` is the window the first extension started from
    (`rope.scaling.original_context_length` when present, else `context_length`), as in a LongRoPE
    checkpoint's config; `context_length` is the window the file runs in now. `base_factors` are the
    per-dimension divisors llama.cpp already applies (rope_freqs times a linear scaling factor), None
    when it applies none; `attention_factor` multiplies cos and sin (1.0 when absent).
    """

    path: Path
    fingerprint: ModelFingerprint
    context_length: int
    base_factors: list[float] | None
    attention_factor: float
    tensor_count: int
    tensor_bytes: int
    reader: gguf.GGUFReader = field(repr=False, compare=False)


@dataclass
class GGUFResult:
    output: Path
    source: Path
    factor_set: FactorSet
    factors_origin: str
    tensors: int
    tensor_bytes: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "source": str(self.source),
            "context_length": self.factor_set.target_length,
            "original_context_length": self.factor_set.model.original_max_position_embeddings,
            "factors": {"method": self.factor_set.method, "origin": self.factors_origin,
                        "attention_factor": self.factor_set.long_mscale},
            "tensors": {"count": self.tensors, "bytes": self.tensor_bytes},
            "seconds": round(self.seconds, 3),
        }


def inspect_gguf(path: str | Path) -> GGUFModel:
    """Read a GGUF file's metadata and tensor table (no tensor data) and check that it can be extended.

    Raises GGUFError for a missing, unreadable or truncated file, a big-endian or split file, an
    architecture other than llama, partial rotary dimensions, or a YaRN/longrope scaling type.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"'{path}': no such GGUF file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError) as error:
        # A truncated download fails here too: gguf maps each tensor's bytes when it reads the table.
        raise GGUFError(f"'{path}': not a readable GGUF file, or a truncated one ({error})") from None
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise GGUFError(f"'{path}' is a big-endian GGUF; only little-endian files are supported")
    if _value(reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1) > 1:
        raise GGUFError(f"'{path}' is one part of a split GGUF; merge the parts first "
                        "(llama-gguf-split --merge FIRST-PART OUT.gguf)")
    nested = next((entry.name for entry in reader.fields.values() if len(entry.types) > 2), None)
    if nested is not None:  # gguf's reader flattens arrays of arrays: copying one would change it
        raise GGUFError(f"'{path}': metadata '{nested}' is an array of arrays, which this tool cannot copy")
    architecture = _value(reader, gguf.Keys.General.ARCHITECTURE, None)
    if architecture != ARCHITECTURE:
        raise GGUFError(f"'{path}' is a '{architecture}' model; llama.cpp applies per-dimension RoPE factors "
                        "(rope_freqs) as LongRoPE needs only for the 'llama' architecture")

    def key(template: str) -> str:
        return template.format(arch=ARCHITECTURE)

    def positive_int(template: str, default: int | None = None) -> int:
        value = _value(reader, key(template), default)
        if value is None:
            raise GGUFError(f"'{path}': metadata '{key(template)}' is missing")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GGUFError(f"'{path}': metadata '{key(template)}' must be a positive integer, got {value!r}")
        return value

    hidden_size = positive_int(gguf.Keys.LLM.EMBEDDING_LENGTH)
    head_dim = positive_int(gguf.Keys.Attention.KEY_LENGTH, hidden_size // positive_int(gguf.Keys.Attention.HEAD_COUNT))
    rotary_dims = positive_int(gguf.Keys.Rope.DIMENSION_COUNT, head_dim)
    if rotary_dims != head_dim or head_dim % 2:
        raise GGUFError(f"'{path}': RoPE rotates {rotary_dims} of {head_dim} dimensions per head; LongRoPE factors "
                        "need all of an even head dimension")
    context_length = positive_int(gguf.Keys.LLM.CONTEXT_LENGTH)
    scaling = _value(reader, key(gguf.Keys.Rope.SCALING_TYPE), "linear")  # llama.cpp's default
    linear_factor = _value(reader, key(gguf.Keys.Rope.SCALING_FACTOR), None) or \
        _value(reader, f"{ARCHITECTURE}.rope.scale_linear", None) or 1.0
    if scaling not in ("none", "linear"):
        raise GGUFError(f"'{path}' already scales RoPE with llama.cpp's '{scaling}' type, which is not a per-dimension "
                        "factor set; extend a GGUF of the model without it")
    base = [linear_factor if scaling == "linear" else 1.0] * (head_dim // 2)
    frequencies = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if frequencies is not None:
        if frequencies.tensor_type != gguf.GGMLQuantizationType.F32 or frequencies.n_elements != head_dim // 2:
            raise GGUFError(f"'{path}': tensor '{ROPE_FREQS}' must be F32 with head_dim/2 = {head_dim // 2} values, "
                            f"got {frequencies.tensor_type.name} with {frequencies.n_elements}")
        base = [b * float(f) for b, f in zip(base, frequencies.data)]
    rope_theta = _value(reader, key(gguf.Keys.Rope.FREQ_BASE), 10000.0)
    fingerprint = ModelFingerprint(
        architecture="LlamaForCausalLM",
        name=path.name,
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        original_max_position_embeddings=positive_int(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN, context_length),
        num_hidden_layers=positive_int(gguf.Keys.LLM.BLOCK_COUNT),
        hidden_size=hidden_size,
    )
    return GGUFModel(
        path=path,
        fingerprint=fingerprint,
        context_length=context_length,
        base_factors=None if all(b == 1.0 for b in base) else base,
        attention_factor=float(_value(reader, key(gguf.Keys.Rope.SCALING_ATTN_FACTOR), 1.0)),
        tensor_count=len(reader.tensors),
        tensor_bytes=sum(t.n_bytes for t in reader.tensors),
        reader=reader,
    )


def _value(reader: gguf.GGUFReader, key: str, default: Any) -> Any:
    entry = reader.get_field(key)
    return default if entry is None else entry.contents()


def compose_on_source_rope(source: GGUFModel, extension: FactorSet) -> FactorSet:
    """The absolute long set for an extension made relative to the source as it runs now.

    `extension` was made for the source's current window (`context_length`) on top of the RoPE it
    already applies; llama.cpp's rope_freqs divide the raw frequencies freq_base^(-2i/d), so the set
    written is lambda_i = base_i * extension_i, with attention factor = source's * extension's long
    mscale (the source's own scaling stays in force under the new one, as the search's progressive
    mode composes a LongRoPE checkpoint's stages). The short set is the source's own. The result
    records the base under provenance `base_factors`, so `check_fits` accepts it for this source.
    """
    half = source.fingerprint.head_dim // 2
    base = source.base_factors or [1.0] * half
    provenance = dict(extension.provenance)
    if source.base_factors is not None:
        provenance["base_factors"] = {"method": "gguf:rope_freqs", "target_length": source.context_length,
                                      "long_factor": list(source.base_factors)}
    return FactorSet(
        model=source.fingerprint,
        target_length=extension.target_length,
        long_factor=[b * e for b, e in zip(base, extension.long_factor)],
        short_factor=list(base),
        n_hat=0,
        long_mscale=source.attention_factor * extension.long_mscale,
        short_mscale=source.attention_factor,
        provenance=provenance,
    )


def resolve_gguf_factors(source: GGUFModel, factors: str | None, target: int | None,
                         status: Callable[[str], None]) -> tuple[FactorSet, str]:
    """The factor set to write into `source` and where it came from.

    `factors`: an analytic method (needs `target`; composed on the source's RoPE), a factor file, a
    folder converted by longrope-convert (its factor file), or None for the shipped searched factors
    of this model at `target` (else factors.DEFAULT_INIT, with a warning). Factor files are absolute;
    `check_fits` decides whether they fit this source.
    """
    if target is not None and target <= source.context_length:
        raise GGUFError(f"{{target}} {target} must be larger than the GGUF's context length {source.context_length}",
                        setting="target", value=target, bound=source.context_length, file=source.path)
    if factors is None:
        if target is None:
            raise GGUFError("give {factors} (a factor file, a converted checkpoint folder, or an analytic method "
                            "with {target}), or {target} alone for the shipped searched factors", setting="factors",
                            file=source.path)
        shipped = find_shipped_factor_set(source.fingerprint, target)
        if shipped is not None and source.base_factors is None:
            return shipped
        status(default_init_warning(target))
        factors = DEFAULT_INIT
    if factors in ANALYTIC_METHODS:
        if target is None:
            raise GGUFError(f"{{factors}} {factors} needs {{target}}", setting="target", file=source.path)
        relative_to_now = replace(source.fingerprint, original_max_position_embeddings=source.context_length)
        return compose_on_source_rope(source, analytic_factor_set(factors, relative_to_now, target)), f"init:{factors}"
    factor_set = load_factor_set(factors)  # a factor file, or a converted checkpoint's
    if target is not None and factor_set.target_length != target:
        raise GGUFError(f"{factors}: factors are for target {factor_set.target_length}, not {{target}} {target}",
                        setting="target", value=target, bound=factor_set.target_length, file=factors)
    return factor_set, str(factors)


def check_fits(source: GGUFModel, factor_set: FactorSet, origin: str) -> None:
    """Raise GGUFError unless `factor_set` (absolute factors) was made for this model and its RoPE.

    The model must match (head_dim, rope_theta, original window, layers, hidden size), and the RoPE the
    set composes on (`made_on`) must be the one the GGUF already applies (`base_factors`, e.g. a Llama
    3.1 GGUF's llama3 rope_freqs): writing a set made on other frequencies would drop or double that
    scaling.
    """
    theirs, mine = asdict(factor_set.model), asdict(source.fingerprint)
    differences = [f"{key} {theirs[key]} (this GGUF: {mine[key]})" for key in mine
                   if key not in ("name", "architecture", "rope_scaling") and theirs[key] != mine[key]]
    if differences:
        raise GGUFError(f"{origin}: factors were made for another model ({factor_set.model.name}): "
                        + ", ".join(differences))
    if factor_set.target_length <= source.context_length:
        raise GGUFError(f"{origin}: factors are for {factor_set.target_length} tokens; '{source.path.name}' already "
                        f"runs at {source.context_length}")
    base = made_on(factor_set)
    if base is None and source.base_factors is None:
        return
    if base is None or source.base_factors is None or not _same_factors(base, source.base_factors):
        gguf_side = ("applies no per-dimension scaling" if source.base_factors is None else
                     f"already scales RoPE per dimension (rope_freqs from {min(source.base_factors):g} to "
                     f"{max(source.base_factors):g})")
        set_side = "the model's raw frequencies" if base is None else f"another scaling (from {min(base):g} to " \
            f"{max(base):g})"
        raise GGUFError(f"{origin}: '{source.path.name}' {gguf_side} and these factors were made on {set_side}; "
                        "writing them would drop or double a scaling. Use an analytic {factors} name (composed on "
                        "the GGUF's own RoPE) or factors made for the checkpoint this GGUF was converted from",
                        setting="factors", value=origin, file=source.path)


def made_on(factor_set: FactorSet) -> list[float] | None:
    """The per-dimension factors of the RoPE a set composes on [head_dim/2], None for the raw frequencies:
    its source's own scaling (factor files of format 2: model.rope_scaling, as source_rope reads it), else
    a base recorded under provenance `base_factors` (compose_on_source_rope, format-1 files)."""
    if factor_set.model.rope_scaling != DEFAULT_ROPE:
        return factor_set.model.base_factor_set().long_factor
    return (factor_set.provenance.get("base_factors") or {}).get("long_factor")


def _same_factors(declared: list[float] | None, actual: list[float]) -> bool:
    return declared is not None and len(declared) == len(actual) and all(
        abs(d - a) <= FACTOR_TOLERANCE * a for d, a in zip(declared, actual))


def default_gguf_output(source: str | Path, target: int) -> Path:
    """./<source stem>-longrope-<16k>.gguf"""
    return Path(f"{default_output(Path(source).stem, target)}.gguf")


def extend_gguf(source: GGUFModel, output: str | Path, factor_set: FactorSet, *, factors_origin: str,
                overwrite: bool = False, status: Callable[[str], None] = lambda message: None) -> GGUFResult:
    """Write `output`: the source GGUF with the long set of `factor_set` as rope_freqs and the keys above.

    Every tensor of the source is copied byte for byte (rope_freqs, if the source has one, is replaced);
    its metadata is kept except the RoPE keys this sets and `longrope.*` provenance it adds. The file is
    staged next to `output` and renamed at the end (outputs.atomic_file, whose checks refuse the source
    itself, a place inside the Hugging Face cache, a folder, and an existing file without `overwrite`).
    Raises GGUFError when the factors do not fit (`check_fits`), OutputError for such an output.
    """
    started = time.perf_counter()
    check_fits(source, factor_set, factors_origin)
    output = Path(output)
    own_short = source.base_factors or [1.0] * (source.fingerprint.head_dim // 2)
    if factor_set.n_hat or not _same_factors(factor_set.short_factor, own_short):
        status(f"WARNING: llama.cpp applies only the long factor set; this set's n_hat ({factor_set.n_hat}) and "
               "short factors are not in the GGUF (see its metadata 'longrope.differences')")
    with atomic_file(output, overwrite=overwrite, protected={source.path: "the source GGUF"},
                     read_only={hub_cache(): "the Hugging Face cache"}) as staging:
        _write_extended(source, factor_set, factors_origin, staging)
    return GGUFResult(output=output, source=source.path, factor_set=factor_set, factors_origin=factors_origin,
                      tensors=source.tensor_count, tensor_bytes=source.tensor_bytes,
                      seconds=time.perf_counter() - started)


def differences_from_remote_code(factor_set: FactorSet) -> str:
    """What llama.cpp runs from this GGUF, against the LongRoPE remote code on the same factors."""
    window = factor_set.model.original_max_position_embeddings
    return (
        f"llama.cpp applies one static factor set: the long set (rope_freqs) with attention factor "
        f"{factor_set.long_mscale:.6g}, at every position and for every context size. Unlike the LongRoPE remote code "
        f"there is no n_hat (this set's n_hat = {factor_set.n_hat}; the first positions are interpolated too) and no "
        f"short-window identity (inputs that fit the original {window}-token window also use the long set, so they "
        "differ slightly from the source model's)."
    )


def _write_extended(source: GGUFModel, factor_set: FactorSet, factors_origin: str, path: Path) -> None:
    reader = source.reader
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    writer.data_alignment = reader.alignment
    updated = {template.format(arch=ARCHITECTURE) for template in (
        gguf.Keys.LLM.CONTEXT_LENGTH, gguf.Keys.Rope.SCALING_TYPE, gguf.Keys.Rope.SCALING_ATTN_FACTOR,
        gguf.Keys.Rope.SCALING_ORIG_CTX_LEN, gguf.Keys.Rope.SCALING_FACTOR, "{arch}.rope.scale_linear")}
    for entry in reader.fields.values():
        # GGUF.* are the reader's view of the header; the writer adds general.architecture itself.
        if entry.name.startswith("GGUF.") or entry.name == gguf.Keys.General.ARCHITECTURE or entry.name in updated \
                or entry.name.startswith("longrope."):
            continue
        value_type = entry.types[0]
        sub_type = entry.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(entry.name, entry.contents(), value_type, sub_type=sub_type)
    # The types llama.cpp expects for these keys (gguf's own writers use them).
    writer.add_context_length(factor_set.target_length)
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    writer.add_rope_scaling_attn_factors(factor_set.long_mscale)
    writer.add_rope_scaling_orig_ctx_len(factor_set.model.original_max_position_embeddings)
    writer.add_string("longrope.tool", f"longrope-convert {__version__}")
    writer.add_string("longrope.source", source.path.name)
    writer.add_string("longrope.factors", factors_origin)
    writer.add_string("longrope.factor_set", json.dumps(factor_set.to_json(), separators=(",", ":")))
    writer.add_string("longrope.differences", differences_from_remote_code(factor_set))

    rope_freqs = np.asarray(factor_set.long_factor, dtype="<f4")  # [head_dim/2]
    copied = [t for t in reader.tensors if t.name != ROPE_FREQS]
    # rope_freqs first, as llama.cpp's converter writes it (conversion/base.py: extra tensors come first).
    writer.add_tensor_info(ROPE_FREQS, rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
    for tensor in copied:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.n_bytes,
                               raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Tensor data starts aligned after the tensor table; each tensor is padded to the alignment
    # (the offsets write_ti_data_to_file just recorded).
    offset = writer.ggml_pad(writer.fout[0].tell(), writer.data_alignment)
    writer.close()
    with open(source.path, "rb") as source_file, open(path, "r+b") as output_file:
        os.pwrite(output_file.fileno(), rope_freqs.tobytes(), offset)
        offset += writer.ggml_pad(rope_freqs.nbytes, writer.data_alignment)
        for tensor in copied:
            _copy_range(source_file.fileno(), tensor.data_offset, output_file.fileno(), offset, tensor.n_bytes)
            offset += writer.ggml_pad(tensor.n_bytes, writer.data_alignment)
        os.ftruncate(output_file.fileno(), offset)  # the last tensor's padding (zeros)


def _copy_range(source: int, source_offset: int, target: int, target_offset: int, length: int) -> None:
    """Copy `length` bytes between two open files at the given offsets: in the kernel (copy_file_range,
    a block-sharing reflink on file systems that have them) where it can, else through one buffer."""
    in_kernel = hasattr(os, "copy_file_range")
    while length > 0:
        if in_kernel:
            try:
                done = os.copy_file_range(source, target, length, source_offset, target_offset)
            except OSError:  # EXDEV, EOPNOTSUPP, ... on some kernels and file systems: copy it ourselves
                in_kernel = False
                continue
        else:
            done = os.pwrite(target, os.pread(source, min(length, COPY_BLOCK_BYTES), source_offset), target_offset)
        if done == 0:
            raise GGUFError(f"the source GGUF ended {length} bytes early while copying")
        source_offset, target_offset, length = source_offset + done, target_offset + done, length - done


def source_ggufs(source: str, revision: str | None, folder: Path, pattern: str, factor_set: FactorSet,
                 factors_origin: str) -> list[GGUFModel]:
    """The GGUF files of a convert SOURCE that match `pattern` (fnmatch on their paths inside the repo
    or folder), each checked against `factor_set`: from the local folder, or downloaded from the Hub
    repo into huggingface_hub's cache. Raises GGUFError when none matches or one does not fit."""
    if looks_like_repo_id(source):
        folder = download_matching(source, revision, pattern)
    paths = sorted(p for p in folder.rglob("*.gguf")
                   if p.is_file() and fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern))
    if not paths:
        raise GGUFError(f"{{gguf}} '{pattern}': no GGUF file of '{source}' matches", setting="gguf", value=pattern,
                        file=source)
    models = [inspect_gguf(path) for path in paths]
    for model in models:
        check_fits(model, factor_set, factors_origin)
    return models
