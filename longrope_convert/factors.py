"""LongRoPE factor sets: the file format, strict validation, model fingerprints, composition and analytic sets.

A factor file is JSON (version 3; version-1 files, which predate model.rope_scaling and short_set, are read
as made for a source without RoPE scaling, short set "factors"; files before version 3 have no
n_hat_mscale and are read as "row", which is what they were made with):

    {
      "format": "longrope-factors", "version": 3,
      "model": {"architecture", "name", "head_dim", "rope_theta", "original_max_position_embeddings",
                "num_hidden_layers", "hidden_size", "rope_scaling"},
      "target_length": 65536,
      "long_factor": [head_dim/2 floats >= 1, non-decreasing],
      "short_factor": [head_dim/2 floats >= 1],
      "n_hat": 0, "n_hat_mscale": "row" | "short",
      "long_mscale": 1.2, "short_mscale": 1.0, "short_set": "factors" | "source",
      "provenance": {"method": "search" | "init:yarn" | ..., "data": [...], "evaluations": 0, ...}
    }

`model.rope_scaling` is the source's own RoPE scaling (source_rope.py: {"rope_type": "default"} for none),
part of what a set was made for: a set is reused only for a source scaled the same way.

Composition. Every set is made on top of the source's own RoPE, its base factor set (source_rope.py):
the short set, its attention scale and n_hat stay the source's, so that inside the source's window a
converted checkpoint is the source; the long set is the source's long factors times new ones,
long_factor_i = base_i * lambda_i (lambda_i >= 1, non-decreasing: so is the product), switched to beyond
the source's original window. For a source without scaling the base is all ones and this is plain
LongRoPE. The analytic sets and the search's candidates are lambda relative to the base, for the
extension s = target / L beyond the length L the source already serves, head dimension d, base b,
theta_i = b^(-2i/d), i = 0 .. d/2 - 1:

    pi      lambda_i = s                                            (Position Interpolation)
    ntk     lambda_i = s^(2i / (d - 2))          (NTK-aware: base b * s^(d/(d-2)))
    yarn    lambda_i = s * r_i + (1 - r_i)       (r_i YaRN's ramp, beta_fast 32, beta_slow 1, as in LongRoPE's
                                                  official YaRN init; mscale 0.1 ln s + 1. Not transformers'
                                                  `yarn` type, which interpolates inv_freq, not lambda)
    llama3  lambda_i = 1 for wavelength < L/4, s for wavelength > L, else 1 / ((1 - a)/s + a)
            with a = (L / wavelength - 1) / 3    (transformers' llama3 type, low 1, high 4)
    ntk-cd  lambda_i = s^(i / c) below c, s from c on
    yarn-cd lambda_i as yarn, with the ramp's upper end moved to c (s from c on; yarn's is at c + 1)

where c is LongRoPE2's critical dimension of theta at L (source_rope.critical_dimension): NTK and YaRN moved to
it, as LongRoPE2 (arXiv 2502.20082) moves them; ntk-cd is the ramp below c of its search space
(evolution.SearchSpace) with every dimension above it at s. Each set has the source's long attention scale
times the method's own (1, or YaRN's 0.1 ln s + 1 for yarn and yarn-cd).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint_files import FACTORS_FILE
from .errors import LongRoPEError, RopeScalingError, TargetError
from .outputs import write_text_atomically
from .source_rope import (
    DEFAULT_ROPE,
    BaseFactorSet,
    base_factor_set,
    critical_dimension,
    critical_ramp,
    llama3_factors,
    long_attention_scales,
    monotone_factors,
    yarn_ramp,
)

FORMAT = "longrope-factors"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# The attention scale of the positions below n_hat (FactorSet.n_hat_mscale) in the sets this version makes:
# the short set's, as LongRoPE's research code (both measured: BENCHMARKS.md, "Search: fidelity and cost").
N_HAT_MSCALE = "short"
ANALYTIC_METHODS = ("pi", "ntk", "yarn", "llama3", "ntk-cd", "yarn-cd")
# Provenance methods of factors an evolutionary search produced; other "search:..." labels (a search stopped
# before any evolution step, say) are reported as what they are.
SEARCHED_METHODS = ("search", "search:short")
# What searches and `eval --baselines` compare with: the classic sets.
CLASSIC_METHODS = ("pi", "ntk", "yarn", "llama3")
# What a conversion gets without searched factors (`init:llama3`, never presented as searched): of the analytic sets,
# the one with the lowest perplexity at 8x on held-out text on both testbeds, at its own attention scale (1), which
# measured better there than LongRoPE's sqrt(1 + ln s / ln L) (BENCHMARKS.md, "Search: fidelity and cost").
DEFAULT_INIT = "llama3"
# Rotary angles are computed from float32 positions (as in stock transformers), which hold integers exactly
# only up to 2**24: beyond it neighbouring positions share an angle.
MAX_TARGET_LENGTH = 2**24
PROVENANCE_FIELDS = {
    "method": "how the factors were made: 'search', 'search:short', 'search:no-evolution', 'baseline:<name>', "
              "'init:<pi|ntk|yarn|llama3|ntk-cd|yarn-cd>', ...",
    "warning": "one sentence on why the method is not a plain 'search', when it is not",
    "source": "the model the factors were made for (folder or Hub id)",
    "data": "documents used, never by a path of the machine: each file's name and sha256, each folder's name, "
            "number of text files and sha256, or the dataset id (documents.data_provenance)",
    "documents": "number of documents evaluated per candidate",
    "eval_length": "tokens per document in the fitness",
    "evaluations": "number of perplexity evaluations",
    "best_perplexity": "fitness of the chosen factors",
    "baseline_perplexities": "fitness of the analytic sets on the same data",
    "preset": "search preset",
    "objective": "what the fitness measured when not plain perplexity: 'needle', the perplexity of the answer "
                 "tokens of needle items built on the data (LongRoPE2), with the items' task, depths, answer "
                 "tokens per item and a hash of the positions scored",
    "space": "search space: 'full' (every lambda searched) or 'critical' (LongRoPE2: lambda >= the extension from "
             "its critical dimension on, a geometric ramp below it), with that dimension",
    "windows": "the documents as windows of the evaluation length, when --data had fewer long documents than "
               "--documents ('NAME#window2': its second window)",
    "budget": "search budget (evaluations, seconds)",
    "seed": "random seed",
    "base_factors": "factors of an earlier stage that these compose with (version-1 files)",
    "composition": "how the set composes with the source's own RoPE scaling: its type, the extension, the rule "
                   "of the long attention scale (and, after a search, each rule's perplexity)",
    "tool_version": "longrope-convert version",
    "created": "UTC timestamp",
    "notes": "free text",
}


class FactorFileError(LongRoPEError):
    """A factor file that is not valid; the message names the file and the field."""


@dataclass(frozen=True)
class ModelFingerprint:
    """What a factor set was made for. `name` is informative; the rest must match to reuse a set.

    original_max_position_embeddings: the window a converted checkpoint switches to its long set beyond (the
    source's window; a LongRoPE source's own original window). rope_scaling: the source's own RoPE scaling
    (BaseFactorSet.rope_scaling), {"rope_type": "default"} for none.
    """

    architecture: str
    name: str
    head_dim: int
    rope_theta: float
    original_max_position_embeddings: int
    num_hidden_layers: int
    hidden_size: int
    rope_scaling: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ROPE))

    def matches(self, other: ModelFingerprint) -> bool:
        mine, theirs = asdict(self), asdict(other)
        mine.pop("name"), theirs.pop("name")
        return mine == theirs

    def base_factor_set(self) -> BaseFactorSet:
        """The source's own RoPE as factor sets (source_rope.base_factor_set); RopeScalingError when the
        recorded scaling is not one LongRoPE composes with."""
        return base_factor_set(self.rope_scaling, self.rope_theta, self.head_dim,
                               self.original_max_position_embeddings)


@dataclass
class FactorSet:
    """LongRoPE factors for one model and target: lambda per frequency dimension ([head_dim/2] floats >= 1,
    relative to theta_i = b^(-2i/d)) for the long set (beyond model.original_max_position_embeddings) and the
    short set, n_hat, and each set's attention scale (cos and sin are multiplied by it).

    short_set "source": inside the window the checkpoint computes the source's own RoPE exactly
    (model.base_factor_set().source_rope; short_factor then holds the same frequencies as factors, for readers
    without the shipped code); "factors": 1 / (short_factor_i * b^(2i/d)).

    n_hat_mscale: the attention scale of the positions below n_hat (`longrope.n_hat_mscale` in a converted
    config). "row": the scale of the set the row uses, so in a long row the long mscale (what the shipped
    modeling file did before the key existed, and still does without it); "short": the short set's, so that
    with the source's own short set they are the source's cos and sin exactly (LongRoPE's research code,
    LlamaSPIScaledStartTokenRotaryEmbedding). The default is "row", what a set without the field means; the
    sets this version makes get N_HAT_MSCALE (source_factor_set).
    """

    model: ModelFingerprint
    target_length: int
    long_factor: list[float]
    short_factor: list[float]
    n_hat: int = 0
    long_mscale: float = 1.0
    short_mscale: float = 1.0
    provenance: dict[str, Any] = field(default_factory=dict)
    short_set: str = "factors"
    n_hat_mscale: str = "row"

    @property
    def scale(self) -> float:
        return self.target_length / self.model.original_max_position_embeddings

    @property
    def method(self) -> str:
        return self.provenance.get("method", "unknown")

    @property
    def is_searched(self) -> bool:
        """Found by an evolutionary search that evolved and beat every baseline it measured (SEARCHED_METHODS):
        what the model card, eval's labels and the README call searched."""
        return self.method in SEARCHED_METHODS

    @property
    def keeps_source_inside_window(self) -> bool:
        """Whether inputs that fit the original window get the source's own RoPE: the short set, its scale and,
        unless the short set is the source's angles anyway, n_hat as the source has them."""
        base = self.model.base_factor_set()
        return (self.short_set == base.short_set and self.short_factor == base.short_factor
                and self.short_mscale == base.short_mscale and (self.n_hat == base.n_hat or base.short_is_source_rope))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": asdict(self.model),
            "target_length": self.target_length,
            "long_factor": list(self.long_factor),
            "short_factor": list(self.short_factor),
            "n_hat": self.n_hat,
            "n_hat_mscale": self.n_hat_mscale,
            "long_mscale": self.long_mscale,
            "short_mscale": self.short_mscale,
            "short_set": self.short_set,
            "provenance": self.provenance,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the file atomically (outputs.write_text_atomically)."""
        write_text_atomically(Path(path), self.dumps())


def load_factor_set(path: str | Path) -> FactorSet:
    """Read and strictly validate a factor file, or the one inside a checkpoint folder converted by this tool
    (FACTORS_FILE); any problem raises FactorFileError naming file and field."""
    path = Path(path)
    if path.is_dir():
        if not (path / FACTORS_FILE).is_file():
            raise FactorFileError(f"'{path}' is a folder without {FACTORS_FILE}; give a factor file or a folder "
                                  "written by longrope-convert")
        path = path / FACTORS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FactorFileError(f"{path}: no such factor file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FactorFileError(f"{path}: not a readable JSON file ({error})") from None
    return factor_set_from_json(data, origin=str(path))


def factor_set_from_json(data: Any, origin: str = "<factors>") -> FactorSet:
    """A factor set from a factor file's JSON (format in the module docstring), version 1, 2 or 3. Raises
    FactorFileError naming `origin` and the first field that is missing, unknown or invalid."""
    def fail(field_name: str, problem: str) -> None:
        raise FactorFileError(f"{origin}: field '{field_name}': {problem}")

    if not isinstance(data, dict):
        fail("<top level>", "must be a JSON object")
    version = data.get("version")
    if "version" in data and version not in READABLE_VERSIONS:
        fail("version", f"unsupported version {version!r} (this tool reads {', '.join(map(str, READABLE_VERSIONS))})")
    expected = {"format", "version", "model", "target_length", "long_factor", "short_factor", "n_hat",
                "long_mscale", "short_mscale", "provenance"}
    expected |= {"short_set"} if version in (2, 3) else set()
    expected |= {"n_hat_mscale"} if version == 3 else set()
    _check_keys(data, expected, expected, "", fail)
    if data["format"] != FORMAT:
        fail("format", f"must be '{FORMAT}', got {data['format']!r}")

    model_fields = {"architecture": str, "name": str, "head_dim": int, "rope_theta": (int, float),
                    "original_max_position_embeddings": int, "num_hidden_layers": int, "hidden_size": int}
    if version in (2, 3):
        model_fields["rope_scaling"] = dict
    model = data["model"]
    if not isinstance(model, dict):
        fail("model", "must be an object")
    _check_keys(model, set(model_fields), set(model_fields), "model.", fail)
    for name, kind in model_fields.items():
        value = model[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            fail(f"model.{name}", f"wrong type {type(value).__name__}")
        if name not in ("architecture", "name", "rope_scaling") and not value > 0:
            fail(f"model.{name}", f"must be positive, got {value}")
    if model["head_dim"] % 2:
        fail("model.head_dim", f"must be even, got {model['head_dim']}")
    fingerprint = ModelFingerprint(**{**model, "rope_theta": float(model["rope_theta"])})
    try:
        base = fingerprint.base_factor_set()
    except RopeScalingError as error:
        raise FactorFileError(f"{origin} (model.rope_scaling): {error}") from None

    target = data["target_length"]
    if isinstance(target, bool) or not isinstance(target, int):
        fail("target_length", "must be an integer")
    if target <= base.max_position_embeddings:
        fail("target_length", f"{target} must exceed the source's window {base.max_position_embeddings}")
    if target > MAX_TARGET_LENGTH:
        fail("target_length", f"{target} is beyond {MAX_TARGET_LENGTH:,} tokens, where float32 positions stop being "
                              "exact")

    half = fingerprint.head_dim // 2
    factors = {}
    for name in ("long_factor", "short_factor"):
        values = data[name]
        if not isinstance(values, list) or len(values) != half:
            count = len(values) if isinstance(values, list) else type(values).__name__
            fail(name, f"must be a list of head_dim/2 = {half} numbers, got {count}")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"{name}[{i}]", f"must be a finite number, got {value!r}")
            if value < 1.0:
                fail(f"{name}[{i}]", f"must be >= 1 (factors only interpolate), got {value}")
        factors[name] = [float(v) for v in values]
    long_factor = factors["long_factor"]
    for i in range(half):
        if i and long_factor[i] < long_factor[i - 1]:
            fail(f"long_factor[{i}]", f"must be non-decreasing, got {long_factor[i]} after {long_factor[i - 1]}")
        if long_factor[i] < base.long_factor[i]:
            fail(f"long_factor[{i}]", f"must be >= the source's own factor {base.long_factor[i]} (new factors only "
                                      f"interpolate further), got {long_factor[i]}")

    n_hat = data["n_hat"]
    if isinstance(n_hat, bool) or not isinstance(n_hat, int) or n_hat < 0:
        fail("n_hat", f"must be a non-negative integer, got {n_hat!r}")
    if n_hat >= fingerprint.original_max_position_embeddings:
        fail("n_hat", f"{n_hat} must be below the original window")
    n_hat_mscale = data.get("n_hat_mscale", "row")
    if n_hat_mscale not in ("row", "short"):
        fail("n_hat_mscale", f"must be 'row' or 'short', got {n_hat_mscale!r}")
    for name in ("long_mscale", "short_mscale"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            fail(name, f"must be a positive finite number, got {value!r}")
    short_set = data.get("short_set", "factors")
    if short_set not in ("source", "factors"):
        fail("short_set", f"must be 'source' or 'factors', got {short_set!r}")

    provenance = data["provenance"]
    if not isinstance(provenance, dict):
        fail("provenance", "must be an object")
    _check_keys(provenance, set(PROVENANCE_FIELDS), {"method"}, "provenance.", fail)
    if not isinstance(provenance["method"], str) or not provenance["method"]:
        fail("provenance.method", "must be a non-empty string")

    return FactorSet(
        model=fingerprint,
        target_length=target,
        long_factor=long_factor,
        short_factor=factors["short_factor"],
        n_hat=n_hat,
        long_mscale=float(data["long_mscale"]),
        short_mscale=float(data["short_mscale"]),
        provenance=provenance,
        short_set=short_set,
        n_hat_mscale=n_hat_mscale,
    )


def _check_keys(data: dict, allowed: set, required: set, prefix: str, fail) -> None:
    for key in data:
        if key not in allowed:
            fail(f"{prefix}{key}", "unknown field")
    for key in sorted(required - set(data)):
        fail(f"{prefix}{key}", "missing")


def provenance_count(value: float) -> int | float:
    """A count as provenance records and cards show it: an integer when whole (24, not 24.0), else to two
    decimals (a search's evaluations are fractions when racing scored a candidate on only some documents)."""
    return int(value) if float(value).is_integer() else round(value, 2)


def new_provenance(method: str, **fields: Any) -> dict[str, Any]:
    return {
        "method": method,
        **fields,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def source_factor_set(model: ModelFingerprint, target_length: int) -> FactorSet:
    """The source's own RoPE as a LongRoPE factor set for `target_length`, before any new factors: short set,
    short scale, n_hat and short_set the source's (its base factor set); long set the source's long factors;
    long attention scale by the default rule of long_attention_scales; the scale below n_hat a LongRoPE
    source's, else N_HAT_MSCALE. What compose() multiplies.

    Raises LongRoPEError when `target_length` does not exceed the length the source already serves, and
    RopeScalingError for a source scaling that LongRoPE does not compose with.
    """
    base = model.base_factor_set()
    if target_length <= base.max_position_embeddings:
        raise TargetError(f"{{target}} {target_length} must be larger than the source's context window "
                          f"{base.max_position_embeddings}", setting="target", value=target_length,
                          bound=base.max_position_embeddings)
    if target_length > MAX_TARGET_LENGTH:
        raise TargetError(f"{{target}} {target_length} is beyond {MAX_TARGET_LENGTH:,} tokens, where float32 "
                          "positions (which rotary angles are computed from) stop being exact", setting="target",
                          value=target_length, bound=MAX_TARGET_LENGTH)
    rule, long_mscale = next(iter(long_attention_scales(base, target_length).items()))
    provenance = {}
    if base.rope_type != "default":
        provenance["composition"] = {"base": base.rope_type, "extends": [base.max_position_embeddings, target_length],
                                     "attention_scale": rule}
    return FactorSet(model=model, target_length=target_length, long_factor=list(base.long_factor),
                     short_factor=list(base.short_factor), n_hat=base.n_hat, long_mscale=long_mscale,
                     short_mscale=base.short_mscale, provenance=provenance, short_set=base.short_set,
                     n_hat_mscale=base.n_hat_mscale or N_HAT_MSCALE)


def compose(source_set: FactorSet, factors: Sequence[float], *, n_hat: int | None = None,
            long_mscale: float | None = None, attention_scale: str | None = None,
            provenance: dict[str, Any] | None = None) -> FactorSet:
    """New long factors on top of a source's own RoPE (source_factor_set): long_factor_i = source_i * factors_i.

    `factors`: lambda relative to the source's long factors, [head_dim/2] floats >= 1, non-decreasing (so the
    product is too). n_hat and long_mscale replace the source set's when given; `attention_scale` names the
    rule long_mscale follows, recorded in the composition provenance; `provenance` is the new set's (the
    composition is added to it). The short set is left as it is: inside the source's window the result is the
    source. The one way every command (convert, search, eval's baselines) builds a long set. Raises ValueError
    for factors of the wrong length, below 1 or decreasing.
    """
    half = len(source_set.long_factor)
    factors = [float(f) for f in factors]
    if len(factors) != half or min(factors) < 1.0 or any(b < a for a, b in zip(factors, factors[1:])):
        raise ValueError(f"new factors must be {half} non-decreasing numbers >= 1, got {factors}")
    provenance = dict(provenance if provenance is not None else source_set.provenance)
    composition = source_set.provenance.get("composition")
    if composition is not None:
        provenance["composition"] = {**composition, **({"attention_scale": attention_scale} if attention_scale else {})}
    return replace(
        source_set,
        long_factor=[b * f for b, f in zip(source_set.long_factor, factors)],
        n_hat=source_set.n_hat if n_hat is None else n_hat,
        long_mscale=source_set.long_mscale if long_mscale is None else long_mscale,
        provenance=provenance,
    )


def analytic_factors(method: str, scale: float, head_dim: int, rope_theta: float,
                     window: int) -> tuple[list[float], float]:
    """A classic method (module docstring) as (lambda [head_dim/2], its attention scale) for an extension by
    `scale` of `window` tokens. Raises LongRoPEError for a method not in ANALYTIC_METHODS."""
    if method not in ANALYTIC_METHODS:
        raise LongRoPEError(f"unknown factor method '{method}' (choose one of {', '.join(ANALYTIC_METHODS)})")
    half = head_dim // 2
    if method == "pi":
        return [scale] * half, 1.0
    if method == "ntk":
        return monotone_factors([scale ** (2 * i / (head_dim - 2)) for i in range(half)]), 1.0
    critical = critical_dimension(head_dim, rope_theta, window)
    if method == "yarn":
        return yarn_factors(scale, head_dim, rope_theta, window), 0.1 * math.log(scale) + 1.0
    if method == "yarn-cd":
        return yarn_factors(scale, head_dim, rope_theta, window, end=critical), 0.1 * math.log(scale) + 1.0
    if method == "ntk-cd":
        return critical_ramp(scale, critical, half), 1.0
    return monotone_factors(llama3_factors(scale, head_dim, rope_theta, window)), 1.0


def analytic_factor_set(method: str, model: ModelFingerprint, target_length: int) -> FactorSet:
    """A classic method as a LongRoPE factor set for `target_length`, composed on the source's own RoPE: its
    lambda for the extension beyond the length the source serves multiplies the source's long factors, its
    attention scale the source's; short set and n_hat stay the source's. Raises LongRoPEError for an unknown
    method or a target within the source's window."""
    source_set = source_factor_set(model, target_length)
    base = model.base_factor_set()
    reach = base.max_position_embeddings
    factors, mscale = analytic_factors(method, target_length / reach, model.head_dim, model.rope_theta, reach)
    # No timestamp: the same inputs give a byte-identical file (and an unchanged push).
    return compose(source_set, factors, long_mscale=base.long_mscale * mscale, attention_scale=f"source x {method}",
                   provenance={"method": f"init:{method}", "tool_version": __version__})


def default_init_warning(target_length: int) -> str:
    """The line a conversion prints when it falls back to DEFAULT_INIT."""
    return (f"WARNING: no searched factors ship for this model at {target_length} tokens; using the {DEFAULT_INIT} "
            f"init (recorded as 'init:{DEFAULT_INIT}', not searched). Run 'longrope-convert search' for searched "
            "factors.")


def baseline_factor_sets(model: ModelFingerprint, target_length: int,
                         methods: Sequence[str] = CLASSIC_METHODS) -> dict[str, FactorSet]:
    """What a searched set is compared with, on the same source and target, by the search and by eval
    --baselines: "none" (the source's own RoPE carried past its window unchanged) and each of `methods` (the classic
    sets, CLASSIC_METHODS) composed on it (analytic_factor_set)."""
    source_set = source_factor_set(model, target_length)
    none = compose(source_set, [1.0] * len(source_set.long_factor), long_mscale=model.base_factor_set().long_mscale,
                   attention_scale="source", provenance={"method": "none"})
    return {"none": none, **{method: analytic_factor_set(method, model, target_length)
                               for method in methods}}


def yarn_factors(scale: float, dim: int, base: float, original_length: int,
                 beta_fast: float = 32, beta_slow: float = 1, end: int | None = None) -> list[float]:
    """LongRoPE's official YaRN init: lambda ramps linearly from 1 (fast dims) to s (slow dims) along YaRN's
    ramp (source_rope.yarn_ramp, whose upper end `end` moves). Not transformers' `yarn` type, which ramps
    inv_freq instead (source_rope.yarn_base)."""
    extrapolations = [1.0 - r for r in yarn_ramp(dim, base, original_length, beta_fast, beta_slow, end=end)]
    return monotone_factors([scale * (1.0 - extrapolate) + extrapolate for extrapolate in extrapolations])


def shipped_factor_dir() -> Path:
    """Where the `factors/` folder of this project is: in the installed wheel, else in the source checkout."""
    try:
        return Path(str(resources.files("longrope_convert.shipped_factors")))
    except ModuleNotFoundError:  # source checkout or editable install: the folder sits next to the package
        return Path(__file__).resolve().parent.parent / "factors"


def find_shipped_factor_set(model: ModelFingerprint, target_length: int,
                            directory: Path | None = None) -> tuple[FactorSet, str] | None:
    """The shipped factor file made for this model fingerprint and target length, if there is one: its set and
    where it came from ("shipped:<folder>/<file>")."""
    directory = directory or shipped_factor_dir()
    if not directory.is_dir():
        return None
    for path in sorted(directory.rglob("*.json")):
        factor_set = load_factor_set(path)
        if factor_set.target_length == target_length and factor_set.model.matches(model):
            return factor_set, f"shipped:{path.parent.name}/{path.name}"
    return None
