"""Write a LongRoPE checkpoint: config with the factors, the modeling file, tokenizer, linked weights.

The output is assembled in a hidden temporary folder next to it and renamed into place at the end,
so an interrupted or failed run leaves nothing half-written. Weights are hard-linked (or copied,
streaming) and never loaded: memory stays flat whatever the model size.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .card import CARD_FILE, hub_model_id, model_card, source_license
from .errors import LongRoPEError
from .factors import (
    ANALYTIC_METHODS,
    FACTORS_FILE,
    FactorSet,
    analytic_factor_set,
    find_shipped_factor_set,
    load_factor_set,
    source_factor_set,
)
from .source import SourceModel
from .source_rope import DEFAULT_ROPE, longrope_attention_factor

MODELING_FILE = "modeling_longrope_llama.py"
# Copied, not imported: conversion never imports torch, so its memory stays flat.
MODELING_SOURCE = Path(__file__).with_name(MODELING_FILE)
AUTO_MAP = {
    "AutoModel": "modeling_longrope_llama.LongRoPELlamaModel",
    "AutoModelForCausalLM": "modeling_longrope_llama.LongRoPELlamaForCausalLM",
}
# Files of the source that travel with the weights (licences must: Llama's licence requires it).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json")
COPIED_PATTERNS = ("LICENSE*", "USE_POLICY*", "NOTICE*")


@dataclass
class ConversionResult:
    output: Path
    factor_set: FactorSet
    factors_origin: str
    weight_files: int
    weight_bytes: int
    weight_mode: str  # "hardlink", "copy" or "mixed"
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "target_length": self.factor_set.target_length,
            "original_max_position_embeddings": self.factor_set.model.original_max_position_embeddings,
            "factors": {"method": self.factor_set.method, "origin": self.factors_origin, "n_hat": self.factor_set.n_hat},
            "weights": {"files": self.weight_files, "bytes": self.weight_bytes, "mode": self.weight_mode},
            "seconds": round(self.seconds, 3),
        }


def resolve_factors(source: SourceModel, target: int, factors: str | None,
                    warn: Callable[[str], None]) -> tuple[FactorSet, str]:
    """The factor set to use and where it came from: a file, an analytic method, or the shipped ones; the
    analytic sets and the default YaRN init composed on the source's own RoPE (factors.compose). Raises
    LongRoPEError for a target the source already reaches, a file made for another source or target."""
    source_factor_set(source.fingerprint, target)  # refuses a target within the source's window
    if factors in ANALYTIC_METHODS:
        return analytic_factor_set(factors, source.fingerprint, target), f"init:{factors}"
    if factors is not None:
        factor_set = load_factor_set(factors)
        if not factor_set.model.matches(source.fingerprint):
            raise LongRoPEError(
                f"{factors}: factors were made for {factor_set.model.name} ({_describe(factor_set.model)}), "
                f"not for this source ({_describe(source.fingerprint)})"
            )
        if factor_set.target_length != target:
            raise LongRoPEError(f"{factors}: factors are for target {factor_set.target_length}, not --target {target}")
        return factor_set, str(factors)
    shipped = find_shipped_factor_set(source.fingerprint, target)
    if shipped is not None:
        return shipped[0], f"shipped:{shipped[1].parent.name}/{shipped[1].name}"
    warn(
        f"WARNING: no searched factors ship for this model at {target} tokens; using the YaRN-derived init "
        "(recorded as 'init:yarn', not searched). Run 'longrope-convert search' for searched factors."
    )
    return analytic_factor_set("yarn", source.fingerprint, target), "init:yarn"


def _describe(model) -> str:
    return (f"head_dim {model.head_dim}, rope_theta {model.rope_theta:g}, window "
            f"{model.original_max_position_embeddings}, {model.num_hidden_layers} layers, hidden {model.hidden_size}, "
            f"rope_type {model.rope_scaling['rope_type']}")


def longrope_config(source_config: dict[str, Any], factor_set: FactorSet) -> dict[str, Any]:
    """The source config with LongRoPE in the standard keys and the extras only the shipped modeling file
    uses (`longrope`), written so that every reader without remote code applies the same factors and
    attention scales:

    - transformers 5.x reads `rope_scaling` (as `rope_parameters`) and `rope_theta`; `attention_factor`
      scales both sets;
    - transformers 4.48-4.57 switch to the long set at the top-level `original_max_position_embeddings`
      (without it they never do); 4.45 applies the long set at every length;
    - vLLM applies `short_mscale` / `long_mscale`, and without them sqrt(1 + ln s / ln L) to both sets
      (`vllm_default_mscale`): they are written, equal to `attention_factor`, only when that default is
      not the attention factor, because transformers logs a warning about keys it does not use.
    """
    original = factor_set.model.original_max_position_embeddings
    config = {key: value for key, value in source_config.items() if key not in ("rope_parameters", "rope_scaling")}
    config["rope_theta"] = factor_set.model.rope_theta
    config["max_position_embeddings"] = factor_set.target_length
    config["original_max_position_embeddings"] = original
    config["rope_scaling"] = {
        "rope_type": "longrope",
        "long_factor": factor_set.long_factor,
        "short_factor": factor_set.short_factor,
        "original_max_position_embeddings": original,
        "factor": factor_set.scale,
        "attention_factor": factor_set.long_mscale,
    }
    if factor_set.long_mscale != vllm_default_mscale(factor_set.target_length, original):
        config["rope_scaling"].update(short_mscale=factor_set.long_mscale, long_mscale=factor_set.long_mscale)
    config["longrope"] = {
        "n_hat": factor_set.n_hat,
        "short_mscale": factor_set.short_mscale,
        "method": factor_set.method,
        "factors_file": FACTORS_FILE,
    }
    source_rope = factor_set.model.base_factor_set().source_rope
    if source_rope != DEFAULT_ROPE:  # a source that scales RoPE: its frequencies before n_hat, maybe the short set
        config["longrope"].update(source_rope=source_rope, short_set=factor_set.short_set)
    config["auto_map"] = dict(AUTO_MAP)
    return config


def vllm_default_mscale(max_position_embeddings: int, original_max_position_embeddings: int) -> float:
    """The attention scale vLLM gives both factor sets of a `longrope` config without `short_mscale` /
    `long_mscale`: sqrt(1 + ln s / ln L), s = max_position_embeddings / L, 1.0 when s <= 1
    (vllm/model_executor/layers/rotary_embedding/phi3_long_rope_scaled_rope.py)."""
    return longrope_attention_factor(max_position_embeddings / original_max_position_embeddings,
                                     original_max_position_embeddings)


@contextmanager
def atomic_folder(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that becomes `output` only if the block completes."""
    if output.exists() and not overwrite:
        raise LongRoPEError(f"output '{output}' already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield staging
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired)
        else:
            os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def link_or_copy(source: Path, target: Path, copy: bool) -> str:
    """Hard-link a weight file (following the Hub cache's symlinks); copy when linking is impossible."""
    real = Path(os.path.realpath(source))
    if not copy:
        try:
            os.link(real, target)
            return "hardlink"
        except OSError:  # other file system, or links not permitted
            pass
    shutil.copyfile(real, target)  # kernel-side copy on Linux: constant memory
    return "copy"


def generated_files(source: SourceModel, factor_set: FactorSet, repo: str) -> dict[str, str]:
    """The files conversion writes itself (the rest is copied or linked from the source)."""
    card = model_card(factor_set, base_model=hub_model_id(source.folder), license_fields=source_license(source.folder),
                      repo=repo)
    return {
        "config.json": json.dumps(longrope_config(source.config, factor_set), indent=2) + "\n",
        MODELING_FILE: MODELING_SOURCE.read_text(),
        FACTORS_FILE: factor_set.dumps(),
        CARD_FILE: card,
    }


def copied_file_names(names: list[str]) -> list[str]:
    """Which of the source's files travel with the weights."""
    return [n for n in names if n in COPIED_FILES or any(fnmatch.fnmatch(n, p) for p in COPIED_PATTERNS)]


def default_output(source_name: str, target: int) -> Path:
    length = f"{target // 1024}k" if target % 1024 == 0 else str(target)
    return Path(f"{Path(source_name).name}-longrope-{length}")


def write_checkpoint(source: SourceModel, factor_set: FactorSet, output: Path, factors_origin: str,
                     overwrite: bool = False, copy_weights: bool = False, repo: str | None = None,
                     log: Callable[[str], None] = lambda message: None) -> ConversionResult:
    """Write the converted checkpoint; `repo` is the name its model card loads it by (default: the folder)."""
    started = time.perf_counter()
    output = Path(output)
    if output.resolve() == source.folder.resolve():
        raise LongRoPEError("output folder must differ from the source folder")
    with atomic_folder(output, overwrite) as staging:
        for name, text in generated_files(source, factor_set, repo or str(output)).items():
            (staging / name).write_text(text)
        for name in copied_file_names(sorted(p.name for p in source.folder.iterdir() if p.is_file())):
            shutil.copyfile(source.folder / name, staging / name)
        modes, total = set(), 0
        for path in source.weight_files:
            log(f"weights: {path.name}")
            modes.add(link_or_copy(path, staging / path.name, copy_weights))
            total += path.stat().st_size
    return ConversionResult(
        output=output,
        factor_set=factor_set,
        factors_origin=factors_origin,
        weight_files=len(source.weight_files),
        weight_bytes=total,
        weight_mode=modes.pop() if len(modes) == 1 else "mixed",
        seconds=time.perf_counter() - started,
    )


def plan_conversion(source: str, revision: str | None, target: int, factors: str | None, output: Path | None,
                    overwrite: bool, copy_weights: bool, push_to: str | None, branch: str | None, private: bool,
                    warn: Callable[[str], None]) -> dict[str, Any]:
    """What a conversion would download, write and push, with sizes; downloads and writes nothing."""
    from .hub import download_plan, looks_like_repo_id
    from .source import describe_config, read_source

    if looks_like_repo_id(source):
        config, download = download_plan(source, revision)
        model = describe_config(config, source, Path(source))
        available = {item["file"]: item["bytes"] for item in download}
    else:
        model, download = read_source(source), []
        available = {p.name: p.stat().st_size for p in model.folder.iterdir() if p.is_file()}
    factor_set, origin = resolve_factors(model, target, factors, warn)
    output = Path(output or default_output(model.name, target))
    if output.exists() and not overwrite:
        raise LongRoPEError(f"output '{output}' already exists; pass --overwrite to replace it")
    written = [{"file": name, "bytes": len(text.encode()), "how": "write"}
               for name, text in generated_files(model, factor_set, push_to or str(output)).items()]
    written += [{"file": name, "bytes": available[name], "how": "copy"} for name in copied_file_names(sorted(available))]
    weights = [n for n in available if n.endswith(".safetensors") or n == "model.safetensors.index.json"]
    written += [{"file": name, "bytes": available[name], "how": "copy" if copy_weights else "hard link"}
                for name in sorted(weights)]
    total = sum(item["bytes"] or 0 for item in written)
    return {
        "source": source, "revision": revision,
        "download": [item for item in download if not item["cached"]],
        "download_bytes": sum(item["bytes"] or 0 for item in download if not item["cached"]),
        "factors": {"method": factor_set.method, "origin": origin, "target_length": target},
        "output": str(output), "write": written, "write_bytes": total,
        "push": {"repo": push_to, "branch": branch or "main", "private": private, "files": len(written),
                 "bytes": total} if push_to else None,
    }
