"""Write a LongRoPE checkpoint: config with the factors, the modeling file, tokenizer, linked weights.

A conversion is planned first (ConversionPlan: every file written, its size, and how it is made),
then either shown (--dry-run) or carried out, so that both walk the same plan. Carrying it out
assembles a staging folder that is renamed into place only when it is complete and checked against
the plan (outputs.atomic_folder): an interrupted or failed run leaves nothing half-written. Weights
are hard-linked (or copied, streaming) and never loaded: memory stays flat whatever the model size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .card import hub_model_id, model_card, source_license
from .checkpoint_files import (
    CARD_FILE,
    COPIED_FILES,
    COPIED_PATTERNS,
    FACTORS_FILE,
    MODELING_FILE,
    has_tokenizer,
    is_conversion_output,
    matches,
)
from .errors import LongRoPEError, OutputError, TargetError
from .factors import (
    ANALYTIC_METHODS,
    DEFAULT_INIT,
    FactorSet,
    analytic_factor_set,
    default_init_warning,
    find_shipped_factor_set,
    load_factor_set,
    source_factor_set,
)
from .fetch import download_source, open_source
from .hub import hub_cache, looks_like_repo_id
from .outputs import MARKER, atomic_folder, check_output_folder, marker_text
from .source import VLLM_WINDOW_KEYS, FolderFiles, SourceModel, read_json, read_source
from .source_rope import DEFAULT_ROPE, longrope_attention_factor

# Copied, not imported: conversion never imports torch, so its memory stays flat.
MODELING_SOURCE = Path(__file__).with_name(MODELING_FILE)
AUTO_MAP = {
    "AutoModel": "modeling_longrope_llama.LongRoPELlamaModel",
    "AutoModelForCausalLM": "modeling_longrope_llama.LongRoPELlamaForCausalLM",
}
# Fields of a checkpoint's files that state its context window; those equal to the source's window
# follow the new one. A tokenizer truncates to model_max_length; generate() stops at, and refuses
# prompts longer than, max_length (meta-llama/Llama-2-7b-hf ships max_length 4096, its window);
# LLaMA-1 conversions (huggyllama/llama-7b) carry max_sequence_length 2048 in config.json, and vLLM
# serves at most the smallest of the config keys it takes as a window (source.VLLM_WINDOW_KEYS;
# max_position_embeddings is set to the target whatever it was).
WINDOW_FIELDS = {
    "config.json": VLLM_WINDOW_KEYS[1:],
    "tokenizer_config.json": ("model_max_length",),
    "generation_config.json": ("max_length", "max_new_tokens"),
}


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


@dataclass(frozen=True)
class PlannedFile:
    name: str
    bytes: int
    how: str  # "write" (the text below), "copy" or "hard link" (the source's file of the same name)
    text: str | None = None


@dataclass
class ConversionPlan:
    """Every file a conversion writes, computed once: --dry-run shows it, write_planned carries it out."""

    source: SourceModel
    factor_set: FactorSet
    factors_origin: str
    output: Path
    files: list[PlannedFile]  # in the order they are written: weights, copies, generated files, marker
    changes: list[dict[str, Any]]  # {"file", "field", "from", "to"}: what states the new window now
    protected: dict[Path, str]  # what the output may not be or contain
    read_only: dict[Path, str]  # what the output may not lie inside
    source_files: list[str]  # the source's files the conversion reads
    download: dict[str, int]  # those of them (bytes) a real run downloads first: a Hub source's, not cached

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source.name,
            "download": [{"file": name, "bytes": size} for name, size in self.download.items()],
            "download_bytes": sum(self.download.values()),
            "factors": {"method": self.factor_set.method, "origin": self.factors_origin,
                        "target_length": self.factor_set.target_length},
            "output": str(self.output),
            "write": [{"file": item.name, "bytes": item.bytes, "how": item.how} for item in self.files],
            "write_bytes": sum(item.bytes for item in self.files),
        }


def resolve_factors(source: SourceModel, target: int, factors: str | None,
                    status: Callable[[str], None]) -> tuple[FactorSet, str]:
    """The factor set to use and where it came from: a file, an analytic method, or the shipped ones; the
    analytic sets and the default init (factors.DEFAULT_INIT) composed on the source's own RoPE (factors.compose). Raises
    LongRoPEError for a target the source already reaches, a file made for another source or target."""
    source_factor_set(source.fingerprint, target)  # refuses a target within the source's window
    if factors in ANALYTIC_METHODS:
        return analytic_factor_set(factors, source.fingerprint, target), f"init:{factors}"
    if factors is not None:
        factor_set = load_factor_set(factors)  # a factor file, or a converted checkpoint's
        if not factor_set.model.matches(source.fingerprint):
            raise LongRoPEError(
                f"{factors}: factors were made for {factor_set.model.name} ({_describe(factor_set.model)}), "
                f"not for this source ({_describe(source.fingerprint)})"
            )
        if factor_set.target_length != target:
            raise TargetError(f"{factors}: factors are for target {factor_set.target_length}, not {{target}} {target}",
                              setting="target", value=target, bound=factor_set.target_length, file=factors)
        return factor_set, str(factors)
    shipped = find_shipped_factor_set(source.fingerprint, target)
    if shipped is not None:
        return shipped
    status(default_init_warning(target))
    return analytic_factor_set(DEFAULT_INIT, source.fingerprint, target), f"init:{DEFAULT_INIT}"


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
      (without it they never do: short factors at every length, silently wrong past the window); 4.45
      applies the long set at every length;
    - vLLM serves that same top-level key's window by default (its choice for every `longrope` model, so that
      short requests keep the short set; `--max-model-len` up to the target serves the long set): written
      anyway, since a default that refuses long prompts beats 4.x readers silently wrong on them;
    - vLLM applies `short_mscale` / `long_mscale`, and without them sqrt(1 + ln s / ln L) to both sets
      (`vllm_default_mscale`): they are written, equal to `attention_factor`, only when that default is
      not the attention factor, because transformers (and vLLM through it) logs a warning about keys it
      does not use. There a warning is the price of vLLM applying the attention factor transformers does.

    Only the shipped modeling file reads `longrope` (n_hat, n_hat_mscale, short_mscale, source_rope, short_set):
    no other reader applies n_hat.
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
        "n_hat_mscale": factor_set.n_hat_mscale,
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


def extend_window_fields(data: Any, file: str, old: int, new: int) -> list[dict[str, Any]]:
    """Set, in place, the WINDOW_FIELDS of a file's JSON that equal the old window `old` to `new`;
    return the changes made ({"file", "field", "from", "to"})."""
    changes = []
    if isinstance(data, dict):
        for field in WINDOW_FIELDS[file]:
            if type(data.get(field)) is int and data[field] == old:
                data[field] = new
                changes.append({"file": file, "field": field, "from": old, "to": new})
    return changes


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
    shutil.copymode(real, target)  # no wider permissions than the source's (a link shares them)
    return "copy"


def copied_file_names(names: list[str]) -> list[str]:
    """Which of the source's files travel with the weights."""
    return [n for n in names if n in COPIED_FILES or matches(n, COPIED_PATTERNS)]


LONGROPE_SUFFIX = re.compile(r"-longrope-\d+k?$")  # what default_output appends


def default_output(source_name: str, target: int) -> Path:
    """./<source name>-longrope-<target> (16k for 16384); a source that is itself a conversion, named
    X-longrope-16k, gives X-longrope-32k rather than X-longrope-16k-longrope-32k."""
    length = f"{target // 1024}k" if target % 1024 == 0 else str(target)
    stem = LONGROPE_SUFFIX.sub("", Path(source_name).name)
    return Path(f"{stem}-longrope-{length}")


def base_model_id(source: SourceModel) -> str | None:
    """The card's base_model: the source's Hub repo id (read remotely, or a snapshot of the Hub cache),
    else None: a local folder's name is no id the Hub accepts."""
    if not isinstance(source.files, FolderFiles):
        return source.name
    return hub_model_id(source.folder)


def source_guards(source: SourceModel) -> tuple[dict[Path, str], dict[Path, str]]:
    """(protected, read_only) for check_output_folder, the same for everything written while working on
    `source` (a conversion, a search's factor file and log): the output may not be or contain the source or
    any of its files (a Hub snapshot's links resolve to the cache blobs), nor lie inside the source or the
    Hugging Face cache (where a Hub source's files are)."""
    read_only = {hub_cache(): "the Hugging Face cache"}
    if not isinstance(source.files, FolderFiles):  # read remotely: nothing of it is on this machine yet
        return {}, read_only
    protected = {source.folder: "the source"}
    protected.update((source.folder / name, "a file of the source") for name in source.files.sizes)
    return protected, {source.folder: "the source", **read_only}


def check_conversion_output(source: SourceModel, output: Path, overwrite: bool, setting: str = "output") -> None:
    """The output folder (given as `setting`) a conversion of `source` may write (outputs.check_output_folder):
    not the source, none of its files, not inside it or the Hugging Face cache (source_guards); an existing one
    only with `overwrite`, and only when it holds nothing but what conversions and evaluations write
    (check_no_foreign_files). Raises OutputError."""
    protected, read_only = source_guards(source)
    check_output_folder(output, overwrite=overwrite, protected=protected, read_only=read_only, setting=setting)
    check_no_foreign_files(output)


def check_no_foreign_files(output: Path) -> None:
    """--overwrite replaces the whole output folder: refuse one that holds files no conversion or evaluation
    writes (a user's notes, another folder), naming them. Raises OutputError."""
    output = Path(output)
    if not output.is_dir():
        return
    foreign = sorted(path.relative_to(output).as_posix() for path in output.rglob("*")
                     if not path.is_dir() and path.name != MARKER and not path.name.endswith(".gguf")
                     and not is_conversion_output(path.relative_to(output).as_posix()))
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"{{output}} '{output}' holds files longrope-convert did not write ({listed}); {{overwrite}} "
                          "replaces the whole folder: move them out first, or choose another {output}",
                          setting="output", value=str(output), file=output)


def plan_checkpoint(source: SourceModel, factor_set: FactorSet, output: Path, factors_origin: str, *,
                    copy_weights: bool = False, repo: str | None = None) -> ConversionPlan:
    """Plan the conversion of `source` with `factor_set` into `output`, reading only small files.

    Written: config.json (longrope_config), the modeling file, the factor file, the model card (naming
    `repo`, default: the output folder) and the MARKER. Copied: the tokenizer, generation config and
    licence files, except those with a window field (WINDOW_FIELDS) equal to the source's window, which
    are rewritten with the new one. Weights: hard-linked, or copied with `copy_weights` or when the output
    is on another file system.
    Raises SourceError when a file that must be rewritten cannot be parsed.
    """
    files = source.files
    old, new = source.config["max_position_embeddings"], factor_set.target_length
    config = longrope_config(source.config, factor_set)
    changes = [{"file": "config.json", "field": "max_position_embeddings", "from": old, "to": new}]
    changes += extend_window_fields(config, "config.json", old, new)
    link = not copy_weights and _same_file_system(source, output)
    planned = [PlannedFile(path.name, files.sizes[path.name], "hard link" if link else "copy")
               for path in source.weight_files]
    copied = copied_file_names(sorted(files.sizes))
    for name in copied:
        if name in WINDOW_FIELDS:
            data = read_json(files, name, source.folder)
            found = extend_window_fields(data, name, old, new)
            if found:
                changes += found
                planned.append(_written(name, json.dumps(data, indent=2, ensure_ascii=False) + "\n"))
                continue
        planned.append(PlannedFile(name, files.sizes[name], "copy"))
    source_card = files.read(CARD_FILE).decode("utf-8", errors="replace") if CARD_FILE in files.sizes else None
    card = model_card(factor_set, base_model=base_model_id(source), license_fields=source_license(source_card),
                      repo=repo or str(output), changes=changes, config=config, tokenizer=has_tokenizer(copied))
    planned += [
        _written("config.json", json.dumps(config, indent=2) + "\n"),
        _written(MODELING_FILE, MODELING_SOURCE.read_text(encoding="utf-8")),
        _written(FACTORS_FILE, factor_set.dumps()),
        _written(CARD_FILE, card),
        _written(MARKER, marker_text(changes=changes)),  # last: a staging folder with it is complete
    ]
    read = sorted({"config.json", *copied, *(path.name for path in source.weight_files),
                   *([CARD_FILE] if source_card is not None else [])})
    protected, read_only = source_guards(source)
    return ConversionPlan(source=source, factor_set=factor_set, factors_origin=factors_origin, output=Path(output),
                          files=planned, changes=changes, protected=protected, read_only=read_only,
                          source_files=read,
                          download={name: files.sizes[name] for name in read if name in files.not_cached})


def _same_file_system(source: SourceModel, output: Path) -> bool:
    """Whether the source's weights (a Hub source's: in the Hugging Face cache) and the output's nearest existing
    folder are on one file system, so that the weights can be hard-linked."""
    where = source.folder if isinstance(source.files, FolderFiles) else hub_cache()
    existing = Path(output).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        return os.stat(os.path.realpath(where)).st_dev == os.stat(existing).st_dev
    except OSError:  # the cache not created yet: nothing to compare, try to link
        return True


def _written(name: str, text: str) -> PlannedFile:
    return PlannedFile(name, len(text.encode("utf-8")), "write", text)


def plan_conversion(source: str | SourceModel, *, target: int, revision: str | None = None,
                    factors: str | None = None, output: Path | None = None, overwrite: bool = False,
                    copy_weights: bool = False, repo: str | None = None, download: bool = True,
                    status: Callable[[str], None] = lambda message: None) -> ConversionPlan:
    """Check everything a conversion of SOURCE (a folder or a Hub repo id, or a source already opened by
    fetch.open_source) needs, and plan it.

    Order: the output location (before anything is read), the source's config and safetensors headers
    (a Hub source is read remotely: config, small files, header bytes), the factors, the plan. With
    `download`, a Hub source's planned files are then downloaded into the Hub cache (nothing else) and
    the plan is made again over the local copy; without it nothing is written anywhere (--dry-run).
    Raises LongRoPEError (SourceError, OutputError, FactorFileError) or the OSError met.
    """
    cache = {hub_cache(): "the Hugging Face cache"}
    if isinstance(source, SourceModel):  # opened already: its own guards below
        model, name, guard = source, source.name, {}
        output = Path(output or default_output(name, target))
    else:
        if looks_like_repo_id(source):
            name, guard = source, cache
        else:
            name, guard = Path(source).resolve().name, {Path(source): "the source"}
        output = Path(output or default_output(name, target))
        check_output_folder(output, overwrite=overwrite, protected=guard, read_only={**guard, **cache})
        model = open_source(source, revision, download=False)
    factor_set, origin = resolve_factors(model, target, factors, status)
    plan = plan_checkpoint(model, factor_set, output, origin, copy_weights=copy_weights, repo=repo)
    if download and not isinstance(model.files, FolderFiles):
        model = read_source(download_source(model.name, revision, files=plan.source_files), name=model.name)
        plan = plan_checkpoint(model, factor_set, output, origin, copy_weights=copy_weights, repo=repo)
    check_output_folder(output, overwrite=overwrite, protected={**guard, **plan.protected},
                        read_only={**guard, **plan.read_only})
    check_no_foreign_files(output)
    return plan


def write_planned(plan: ConversionPlan, *, overwrite: bool = False,
                  status: Callable[[str], None] = lambda message: None,
                  extra: Callable[[Path], None] | None = None) -> ConversionResult:
    """Carry out a plan: assemble the output in a staging folder, check every file against the plan,
    let `extra(staging)` add files of its own (convert --gguf), then rename it into place (replacing an
    earlier output only with `overwrite`).
    Raises OutputError, LongRoPEError when a source file changed since planning, or the OSError met."""
    started = time.perf_counter()
    folder = plan.source.folder
    weights = {path.name for path in plan.source.weight_files}
    weight_modes = set()
    with atomic_folder(plan.output, overwrite=overwrite, protected=plan.protected,
                       read_only=plan.read_only) as staging:
        for item in plan.files:
            if item.how == "write":
                (staging / item.name).write_text(item.text, encoding="utf-8")
                continue
            if item.name in weights:
                status(f"weights: {item.name}")
            mode = link_or_copy(folder / item.name, staging / item.name, copy=item.how == "copy")
            if item.name in weights:
                weight_modes.add(mode)
        for item in plan.files:
            written = (staging / item.name).stat().st_size
            if written != item.bytes:
                raise LongRoPEError(f"{folder / item.name} changed during the conversion ({item.bytes} bytes planned, "
                                    f"{written} found); nothing was written: run the command again")
        if extra is not None:
            extra(staging)
    return ConversionResult(
        output=plan.output,
        factor_set=plan.factor_set,
        factors_origin=plan.factors_origin,
        weight_files=len(weights),
        weight_bytes=sum(item.bytes for item in plan.files if item.name in weights),
        weight_mode=weight_modes.pop() if len(weight_modes) == 1 else "mixed",
        seconds=time.perf_counter() - started,
    )


def write_checkpoint(source: SourceModel, factor_set: FactorSet, output: Path, factors_origin: str,
                     overwrite: bool = False, copy_weights: bool = False, repo: str | None = None,
                     status: Callable[[str], None] = lambda message: None) -> ConversionResult:
    """Plan and write the converted checkpoint; `repo` is the name its model card loads it by (default:
    the folder). Raises as plan_checkpoint and write_planned do."""
    plan = plan_checkpoint(source, factor_set, output, factors_origin, copy_weights=copy_weights, repo=repo)
    return write_planned(plan, overwrite=overwrite, status=status)
