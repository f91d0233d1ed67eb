"""The source checkpoint: its config (4.x- or 5.x-style RoPE keys) and its safetensors weights.

Nothing here loads tensors: weights are checked by reading safetensors headers only, through a
SourceFiles view, so that a local folder and a Hub repo read remotely (fetch.HubFiles) are checked by
the same code before anything is downloaded or written.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from .checkpoint_files import SAFETENSORS_INDEX, pickle_files
from .errors import LongRoPEError, RopeScalingError, SourceError
from .factors import VERSION, FactorSet, ModelFingerprint, factor_set_from_json
from .source_rope import BaseFactorSet, base_factor_set

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024
# The config keys vLLM takes as a model's window: it serves at most the smallest of them (model_max_length, when
# present, instead), refusing a longer --max-model-len (vLLM 0.34.0, vllm/transformers_utils/
# model_arch_config_convertor.py:375-408, derive_max_model_len_and_key; vllm/config/model.py:2701-2727).
VLLM_WINDOW_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                    "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")


@dataclass
class RopeSettings:
    """The source's RoPE, read from either config style."""

    rope_type: str
    rope_theta: float
    parameters: dict[str, Any]


class SourceFiles(Protocol):
    """The top-level files of a checkpoint, local or on the Hub: their sizes, and bytes on demand."""

    sizes: dict[str, int]  # file name -> bytes
    not_cached: set[str]  # names a real run would download first

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """`length` bytes of a file from byte `start` (the rest of it when length is None)."""


class FolderFiles:
    """The files of a local checkpoint folder (a Hub snapshot's links are followed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.sizes = {path.name: path.stat().st_size for path in sorted(self.folder.iterdir()) if path.is_file()}
        self.not_cached: set[str] = set()

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        with open(self.folder / name, "rb") as handle:
            handle.seek(start)
            return handle.read(-1 if length is None else length)


@dataclass
class SourceModel:
    folder: Path
    name: str
    config: dict[str, Any]
    rope: RopeSettings
    fingerprint: ModelFingerprint
    weight_files: list[Path]  # shards, plus the index file when sharded
    longrope: FactorSet | None = None  # the factors of a source that is itself a LongRoPE checkpoint
    files: SourceFiles | None = None  # what the checks read; set by describe_source

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
    """Check a local checkpoint folder and describe it; raises SourceError with what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"source '{folder}' is not a folder")
    return describe_source(FolderFiles(folder), name or folder.resolve().name, folder)


def describe_source(files: SourceFiles, name: str, folder: Path) -> SourceModel:
    """Check a checkpoint's config.json and its safetensors headers against each other and against the
    Llama architecture, reading nothing else; `folder` names it in messages. Raises SourceError."""
    if "config.json" not in files.sizes:
        raise SourceError(f"source '{folder}' has no config.json; is it a Hugging Face checkpoint folder?")
    source = describe_config(read_json(files, "config.json", folder), name, folder)
    source.files = files
    source.weight_files = [folder / weight for weight in check_weights(source)]
    return source


def read_json(files: SourceFiles, name: str, folder: Path) -> Any:
    """A JSON file of a checkpoint, parsed; SourceError naming it when it cannot be read or parsed."""
    try:
        return json.loads(files.read(name))
    except (OSError, ValueError) as error:  # ValueError: undecodable bytes or bad JSON
        raise SourceError(f"{folder / name}: not a readable JSON file ({error})") from None


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
    quantization = config.get("quantization_config")
    if quantization is not None:  # the weights are not the plain tensors a Llama loads (GPTQ, AWQ, bnb, FP8...)
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else quantization
        raise SourceError(
            f"source '{name}' is quantized (quant_method '{method}'); longrope-convert converts unquantized "
            "checkpoints (fp32, bf16, fp16): convert the model it was quantized from, then quantize the result")
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
        rope_scaling.update({key: extras[key] for key in ("n_hat", "n_hat_mscale", "short_mscale", "short_set",
                                                          "source_rope") if key in extras})
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
        "n_hat_mscale": base.n_hat_mscale,
        "long_mscale": base.long_mscale,
        "short_mscale": base.short_mscale,
        "short_set": base.short_set,
        "provenance": {"method": extras.get("method", "checkpoint")},
    }, origin=f"{origin} (rope_scaling)")


def check_weights(source: SourceModel) -> list[str]:
    """The names of the safetensors weight files (shards then the index, or model.safetensors), their
    headers checked against each other, the file sizes and the config (check_llama_shapes).
    Raises SourceError."""
    files, folder = source.files, source.folder
    index_path = folder / SAFETENSORS_INDEX
    if SAFETENSORS_INDEX in files.sizes:
        index = read_json(files, SAFETENSORS_INDEX, folder)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise SourceError(f"{index_path}: not a valid safetensors index (needs a non-empty 'weight_map')")
        shard_names = sorted(set(weight_map.values()))
        tensors: dict[str, dict] = {}
        for shard_name in shard_names:
            if Path(shard_name).name != shard_name or shard_name not in files.sizes:
                raise SourceError(f"{index_path}: shard '{shard_name}' is missing from {folder}")
            header = read_safetensors_header(files, shard_name, folder)
            for tensor_name in header:
                tensors[tensor_name] = header[tensor_name]
                if weight_map.get(tensor_name) != shard_name:
                    raise SourceError(f"{folder / shard_name}: tensor '{tensor_name}' is not mapped to this shard by "
                                      "the index")
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise SourceError(f"{index_path}: tensor '{missing[0]}' (and {len(missing) - 1} more) not in its shard")
        names = [*shard_names, SAFETENSORS_INDEX]
    elif "model.safetensors" in files.sizes:
        tensors = read_safetensors_header(files, "model.safetensors", folder)
        names = ["model.safetensors"]
    else:
        pickles = pickle_files(files.sizes)
        if pickles:
            raise SourceError(
                f"source '{folder}' has only pickle weights ({', '.join(pickles[:3])}); longrope-convert never "
                "loads pickle files: convert them to safetensors first (load once with transformers and "
                "save_pretrained(..., safe_serialization=True)) or use a repo that ships *.safetensors"
            )
        raise SourceError(f"source '{folder}' has no model.safetensors or {SAFETENSORS_INDEX}")
    check_llama_shapes(source, tensors)
    return names


def read_safetensors_header(files: SourceFiles, name: str, folder: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file ({tensor: {"dtype", "shape", "data_offsets"}}), checked
    against the format (https://huggingface.co/docs/safetensors: an 8-byte little-endian header length,
    a JSON header, then the tensors' bytes, contiguous) and the file's size. Raises SourceError."""
    path, size = folder / name, files.sizes[name]
    prefix = files.read(name, 0, 8)
    if len(prefix) < 8:
        raise SourceError(f"{path}: truncated safetensors file ({size} bytes)")
    (header_length,) = struct.unpack("<Q", prefix)
    if header_length > MAX_HEADER_BYTES or 8 + header_length > size:
        raise SourceError(f"{path}: corrupt safetensors header (header length {header_length}, file {size} bytes)")
    try:
        header = json.loads(files.read(name, 8, header_length))
    except ValueError:  # undecodable bytes or bad JSON
        raise SourceError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not an object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_length
    spans = []
    for tensor, entry in header.items():
        if not _valid_entry(entry):
            raise SourceError(f"{path}: corrupt safetensors header entry for tensor '{tensor}'")
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype] or begin < 0 or end > data_size:
            raise SourceError(
                f"{path}: tensor '{tensor}' ({dtype} {shape}) has offsets {begin}..{end} that do not fit its size "
                f"or the file's {data_size} data bytes (truncated download?)"
            )
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise SourceError(f"{path}: safetensors data has a hole or overlap at byte {covered}")
        covered = end
    if covered != data_size:
        raise SourceError(f"{path}: {data_size - covered} bytes after the last tensor (not a valid safetensors file)")
    return header


def _valid_entry(entry: Any) -> bool:
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    return (isinstance(entry, dict) and entry.get("dtype") in DTYPE_BYTES
            and isinstance(entry.get("shape"), list) and all(count(d) for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
            and all(count(offset) for offset in entry["data_offsets"]))


def llama_tensor_shapes(source: SourceModel) -> dict[str, list[int]]:
    """Every tensor LlamaForCausalLM loads, with the shape its config implies: the embeddings, each
    layer's attention (q, k, v, o) and MLP (gate, up, down) projections with their biases when
    attention_bias / mlp_bias, both norms, the final norm, and lm_head unless tie_word_embeddings.
    Absent keys take transformers' LlamaConfig defaults (vocab_size 32000, intermediate_size 11008,
    num_key_value_heads = num_attention_heads, no biases, tie_word_embeddings false: see
    transformers/models/llama/configuration_llama.py, 5.24). Raises SourceError for a mistyped key."""
    config, fingerprint = source.config, source.fingerprint

    def setting(key: str, default: Any, kind: type) -> Any:
        value = config.get(key)
        if value is None:
            return default
        wrong = isinstance(value, bool) != (kind is bool) or not isinstance(value, kind)
        if wrong or (kind is int and value <= 0):
            expected = "true or false" if kind is bool else "a positive integer"
            raise SourceError(f"{source.folder / 'config.json'}: '{key}' must be {expected}, got {value!r}")
        return value

    heads, hidden, head_dim = config["num_attention_heads"], fingerprint.hidden_size, fingerprint.head_dim
    vocab = setting("vocab_size", 32000, int)
    intermediate = setting("intermediate_size", 11008, int)
    kv_heads = setting("num_key_value_heads", heads, int)
    attention_bias, mlp_bias = setting("attention_bias", False, bool), setting("mlp_bias", False, bool)
    shapes = {"model.embed_tokens.weight": [vocab, hidden]}
    for layer in range(fingerprint.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        projections = {"self_attn.q_proj": [heads * head_dim, hidden], "self_attn.k_proj": [kv_heads * head_dim, hidden],
                       "self_attn.v_proj": [kv_heads * head_dim, hidden], "self_attn.o_proj": [hidden, heads * head_dim],
                       "mlp.gate_proj": [intermediate, hidden], "mlp.up_proj": [intermediate, hidden],
                       "mlp.down_proj": [hidden, intermediate]}
        for module, shape in projections.items():
            shapes[f"{prefix}{module}.weight"] = shape
            if attention_bias if module.startswith("self_attn") else mlp_bias:
                shapes[f"{prefix}{module}.bias"] = shape[:1]
        shapes[f"{prefix}input_layernorm.weight"] = [hidden]
        shapes[f"{prefix}post_attention_layernorm.weight"] = [hidden]
    shapes["model.norm.weight"] = [hidden]
    if not setting("tie_word_embeddings", False, bool):
        shapes["lm_head.weight"] = [vocab, hidden]
    return shapes


def check_llama_shapes(source: SourceModel, tensors: dict[str, dict]) -> None:
    """The weights must hold the Llama the config describes: every tensor of llama_tensor_shapes with
    its shape (extra tensors are allowed). Names may lack the "model." prefix, as a LlamaModel saves
    them. Raises SourceError naming the first tensor missing or of the wrong shape."""
    where = f"source '{source.folder}'"
    layers = {int(m.group(1)) for name in tensors if (m := re.match(r"(?:model\.)?layers\.(\d+)\.", name))}
    if layers != set(range(source.fingerprint.num_hidden_layers)):
        raise SourceError(f"{where}: weights hold {len(layers)} decoder layers, config.json says "
                          f"{source.fingerprint.num_hidden_layers}")
    bare = "model.embed_tokens.weight" not in tensors and "embed_tokens.weight" in tensors
    for name, shape in llama_tensor_shapes(source).items():
        stored = name.removeprefix("model.") if bare else name
        entry = tensors.get(stored)
        if entry is None and name == "lm_head.weight":
            tied = source.config.get("tie_word_embeddings")
            raise SourceError(
                f"{where}: no tensor 'lm_head.weight', and config.json does not tie the output head to the input "
                f"embeddings (tie_word_embeddings {'absent, false by default' if tied is None else 'false'}): "
                "loading it would initialise a random output head")
        if entry is None:
            raise SourceError(f"{where}: no tensor '{stored}' in the weights; a Llama of this config.json needs it")
        if entry["shape"] != shape:
            raise SourceError(f"{where}: '{stored}' has shape {entry['shape']}, config.json implies {shape} "
                              f"(head_dim {source.fingerprint.head_dim}, hidden_size {source.fingerprint.hidden_size})")
