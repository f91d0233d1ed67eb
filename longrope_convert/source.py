"""The source checkpoint: its config (4.x- or 5.x-style RoPE keys) and its safetensors weights.

Nothing here loads tensors: weights are checked by reading safetensors headers only.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .errors import LongRoPEError, RopeScalingError
from .factors import VERSION, FactorSet, ModelFingerprint, factor_set_from_json
from .source_rope import BaseFactorSet, base_factor_set

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "consolidated.*")
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class RopeSettings:
    """The source's RoPE, read from either config style."""

    rope_type: str
    rope_theta: float
    parameters: dict[str, Any]


@dataclass
class SourceModel:
    folder: Path
    name: str
    config: dict[str, Any]
    rope: RopeSettings
    fingerprint: ModelFingerprint
    weight_files: list[Path]  # shards, plus the index file when sharded
    longrope: FactorSet | None = None  # the factors of a source that is itself a LongRoPE checkpoint

    @property
    def original_window(self) -> int:
        return self.fingerprint.original_max_position_embeddings


def read_rope_settings(config: dict[str, Any]) -> RopeSettings:
    """RoPE type, theta and parameters as stock transformers 5.x reads them, from every config layout met on the
    Hub: 5.x `rope_parameters`; 4.x top-level `rope_theta` with `rope_scaling` (null, or keyed `rope_type` or the
    older `type`); Phi-3's top-level `original_max_position_embeddings`. The rules of transformers'
    RotaryEmbeddingConfigMixin (convert_rope_params_to_dict, standardize_rope_params in modeling_rope_utils.py, 5.24):

    - `rope_scaling` takes precedence over `rope_parameters`;
    - rope_theta: the dict's own, else the top-level one, else 10000;
    - rope_type: `rope_type`, else `type`, else "default";
    - for llama3, yarn and longrope, original_max_position_embeddings: the top-level key when the config has
      one (where Phi-3 keeps its pretraining window; transformers applies it over the dict's own each time it
      computes the frequencies), else the dict's own, else max_position_embeddings.

    `parameters` keeps the dict's other keys as they are, with rope_type and original_max_position_embeddings
    resolved, without rope_theta. Raises LongRoPEError for a dict that is not one or a rope_theta <= 1.
    """
    parameters = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(parameters, dict):
        raise LongRoPEError(f"config.json: 'rope_parameters'/'rope_scaling' must be an object, got {parameters!r}")
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
        raise LongRoPEError(f"config.json: rope_theta must be a number > 1, got {theta!r}")
    parameters = {key: value for key, value in parameters.items() if key not in ("type", "rope_theta")}
    parameters["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn", "longrope"):
        top_level = config.get("original_max_position_embeddings")
        parameters["original_max_position_embeddings"] = (
            top_level if top_level is not None
            else parameters.get("original_max_position_embeddings", config.get("max_position_embeddings")))
    return RopeSettings(rope_type=rope_type, rope_theta=float(theta), parameters=parameters)


def read_source(folder: str | Path, name: str | None = None) -> SourceModel:
    """Check a local checkpoint folder and describe it; raises LongRoPEError with what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LongRoPEError(f"source '{folder}' is not a folder")
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise LongRoPEError(f"source '{folder}' has no config.json; is it a Hugging Face checkpoint folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LongRoPEError(f"{config_path}: not a readable JSON file ({error})") from None
    source = describe_config(config, name or folder.resolve().name, folder)
    source.weight_files = check_weights(source)
    return source


def open_source(source: str, revision: str | None = None) -> SourceModel:
    """A local folder, or a Hub repo id downloaded (only what conversion needs) into the Hub cache."""
    from .hub import download_source, looks_like_repo_id

    if looks_like_repo_id(source):
        return read_source(download_source(source, revision), name=source)
    if revision is not None:
        raise LongRoPEError(f"--revision applies to Hub repo ids; '{source}' is a local path")
    return read_source(source)


def describe_config(config: Any, name: str, folder: Path) -> SourceModel:
    """What a checkpoint's config.json says (no weights looked at yet)."""
    config_path = folder / "config.json"
    if not isinstance(config, dict):
        raise LongRoPEError(f"{config_path}: must be a JSON object")
    model_type = config.get("model_type")
    if model_type != "llama":
        raise LongRoPEError(
            f"source '{name}' is a '{model_type}' model; longrope-convert converts Llama checkpoints "
            "(model_type 'llama')"
        )
    rope = read_rope_settings(config)
    partial = rope.parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise LongRoPEError(f"source '{name}' rotates only part of each head (partial_rotary_factor {partial})")

    def positive_int(key: str) -> int:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LongRoPEError(f"{config_path}: '{key}' must be a positive integer, got {value!r}")
        return value

    hidden_size = positive_int("hidden_size")
    heads = positive_int("num_attention_heads")
    head_dim = config.get("head_dim") or hidden_size // heads
    if head_dim % 2:
        raise LongRoPEError(f"{config_path}: head_dim {head_dim} is odd; RoPE needs an even head dimension")
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    # vLLM's short_mscale / long_mscale are not what stock transformers applies (attention_factor, to both sets)
    rope_scaling = {key: value for key, value in rope.parameters.items() if key not in ("short_mscale", "long_mscale")}
    if rope.rope_type == "longrope" and isinstance(config.get("longrope"), dict):
        # A checkpoint this tool wrote: n_hat, short set and short mscale as its modeling file applies them.
        extras = config["longrope"]
        rope_scaling.update({key: extras[key] for key in ("n_hat", "short_mscale", "short_set", "source_rope")
                             if key in extras})
        rope_scaling.setdefault("short_mscale", 1.0)  # the shipped file's default
    try:
        base = base_factor_set(rope_scaling, rope.rope_theta, head_dim, positive_int("max_position_embeddings"))
    except RopeScalingError as error:
        raise RopeScalingError(f"source '{name}' (rope_scaling): {error}") from None
    fingerprint = ModelFingerprint(
        architecture=architectures[0],
        name=name,
        head_dim=head_dim,
        rope_theta=rope.rope_theta,
        # where a converted checkpoint switches to its long set: the source's window (a LongRoPE source's own
        # original window: beyond it the source already used its long set)
        original_max_position_embeddings=base.original_max_position_embeddings,
        num_hidden_layers=positive_int("num_hidden_layers"),
        hidden_size=hidden_size,
        rope_scaling=base.rope_scaling,
    )
    longrope = checkpoint_factor_set(base, fingerprint, config, config_path) if rope.rope_type == "longrope" else None
    return SourceModel(folder=folder, name=name, config=config, rope=rope, fingerprint=fingerprint,
                       weight_files=[], longrope=longrope)


def checkpoint_factor_set(base: BaseFactorSet, fingerprint: ModelFingerprint, config: dict[str, Any],
                          origin: Path) -> FactorSet:
    """The factor set a LongRoPE checkpoint's config describes (its base factor set, read back as the set it was
    made from: for the model underneath, whose RoPE is its source_rope), checked like a factor file."""
    extras = config.get("longrope") or {}
    made_for = replace(fingerprint, rope_scaling=base.source_rope)
    return factor_set_from_json({
        "format": "longrope-factors", "version": VERSION,
        "model": asdict(made_for),
        "target_length": base.max_position_embeddings,
        "long_factor": base.long_factor,
        "short_factor": base.short_factor,
        "n_hat": base.n_hat,
        "long_mscale": base.long_mscale,
        "short_mscale": base.short_mscale,
        "short_set": base.short_set,
        "provenance": {"method": extras.get("method", "checkpoint")},
    }, origin=f"{origin} (rope_scaling)")


def check_weights(source: SourceModel) -> list[Path]:
    """Find the safetensors weights and validate their headers against each other and the config."""
    folder = source.folder
    index_path = folder / SAFETENSORS_INDEX
    single = folder / "model.safetensors"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict) and weight_map
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise LongRoPEError(f"{index_path}: not a valid safetensors index (needs a non-empty 'weight_map')") from None
        shard_names = sorted(set(weight_map.values()))
        tensors: dict[str, dict] = {}
        for shard_name in shard_names:
            shard = folder / shard_name
            if Path(shard_name).name != shard_name or not shard.is_file():
                raise LongRoPEError(f"{index_path}: shard '{shard_name}' is missing from {folder}")
            header = read_safetensors_header(shard)
            for tensor_name in header:
                tensors[tensor_name] = header[tensor_name]
                if weight_map.get(tensor_name) != shard_name:
                    raise LongRoPEError(f"{shard}: tensor '{tensor_name}' is not mapped to this shard by the index")
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise LongRoPEError(f"{index_path}: tensor '{missing[0]}' (and {len(missing) - 1} more) not in its shard")
        files = [folder / name for name in shard_names] + [index_path]
    elif single.is_file():
        tensors = read_safetensors_header(single)
        files = [single]
    else:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
        if pickles:
            raise LongRoPEError(
                f"source '{folder}' has only pickle weights ({', '.join(pickles[:3])}); longrope-convert never "
                "loads pickle files: convert them to safetensors first (load once with transformers and "
                "save_pretrained(..., safe_serialization=True)) or use a repo that ships *.safetensors"
            )
        raise LongRoPEError(f"source '{folder}' has no model.safetensors or {SAFETENSORS_INDEX}")
    check_llama_shapes(source, tensors)
    return files


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, checked for consistency with the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise LongRoPEError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > MAX_HEADER_BYTES or 8 + header_length > size:
            raise LongRoPEError(f"{path}: corrupt safetensors header (header length {header_length}, file {size} bytes)")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LongRoPEError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise LongRoPEError(f"{path}: corrupt safetensors header (not an object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_length
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            itemsize = DTYPE_BYTES[dtype]
            assert all(isinstance(d, int) and d >= 0 for d in shape)
            assert isinstance(begin, int) and isinstance(end, int)
        except (KeyError, TypeError, ValueError, AssertionError):
            raise LongRoPEError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if end - begin != math.prod(shape) * itemsize or begin < 0 or end > data_size:
            raise LongRoPEError(
                f"{path}: tensor '{name}' ({dtype} {shape}) has offsets {begin}..{end} that do not fit its size "
                f"or the file's {data_size} data bytes (truncated download?)"
            )
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise LongRoPEError(f"{path}: safetensors data has a hole or overlap at byte {covered}")
        covered = end
    if covered != data_size:
        raise LongRoPEError(f"{path}: {data_size - covered} bytes after the last tensor (not a valid safetensors file)")
    return header


def check_llama_shapes(source: SourceModel, tensors: dict[str, dict]) -> None:
    """The weights must be the Llama the config describes: layer count and attention projection shapes."""
    config, fingerprint = source.config, source.fingerprint
    layers = {int(m.group(1)) for name in tensors if (m := re.match(r"(?:model\.)?layers\.(\d+)\.", name))}
    if layers != set(range(fingerprint.num_hidden_layers)):
        raise LongRoPEError(
            f"source '{source.folder}': weights hold {len(layers)} decoder layers, config.json says "
            f"{fingerprint.num_hidden_layers}"
        )
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    expected = {
        "self_attn.q_proj.weight": [config["num_attention_heads"] * fingerprint.head_dim, fingerprint.hidden_size],
        "self_attn.k_proj.weight": [kv_heads * fingerprint.head_dim, fingerprint.hidden_size],
    }
    for suffix, shape in expected.items():
        entry = tensors.get(f"model.layers.0.{suffix}") or tensors.get(f"layers.0.{suffix}")
        if entry is None:
            raise LongRoPEError(f"source '{source.folder}': no attention weight 'model.layers.0.{suffix}'; not a Llama checkpoint")
        if entry["shape"] != shape:
            raise LongRoPEError(
                f"source '{source.folder}': 'model.layers.0.{suffix}' has shape {entry['shape']}, config.json "
                f"implies {shape} (head_dim {fingerprint.head_dim})"
            )
