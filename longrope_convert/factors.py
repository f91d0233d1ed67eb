"""LongRoPE factor sets: the file format, strict validation, model fingerprints and analytic sets.

A factor file is JSON:

    {
      "format": "longrope-factors", "version": 1,
      "model": {"architecture", "name", "head_dim", "rope_theta", "original_max_position_embeddings",
                "num_hidden_layers", "hidden_size"},
      "target_length": 65536,
      "long_factor": [head_dim/2 floats >= 1, non-decreasing],
      "short_factor": [head_dim/2 floats >= 1],
      "n_hat": 0, "long_mscale": 1.2, "short_mscale": 1.0,
      "provenance": {"method": "search" | "init:yarn" | ..., "data": [...], "evaluations": 0, ...}
    }

The analytic sets (the classic baselines and the search's starting points), for scale s = target / L,
head dimension d, base b, theta_i = b^(-2i/d), i = 0 .. d/2 - 1:

    pi      lambda_i = s                                            (Position Interpolation)
    ntk     lambda_i = s^(2i / (d - 2))          (NTK-aware: base b * s^(d/(d-2)))
    yarn    lambda_i = s * (1 - m_i) + m_i       (m_i = 1 - ramp(i; low, high), beta_fast 32, beta_slow 1,
                                                  as in LongRoPE's official YaRN init; mscale 0.1 ln s + 1)
    llama3  lambda_i = 1 for wavelength < L/4, s for wavelength > L, else 1 / ((1 - a)/s + a)
            with a = (L / wavelength - 1) / 3    (transformers' llama3 type, low 1, high 4)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .errors import LongRoPEError
from .outputs import write_text_atomically

FACTORS_FILE = "longrope_factors.json"  # its name inside a converted checkpoint
FORMAT = "longrope-factors"
VERSION = 1
ANALYTIC_METHODS = ("pi", "ntk", "yarn", "llama3")
PROVENANCE_FIELDS = {
    "method": "how the factors were made: 'search', 'search:short', 'search:no-evolution', 'baseline:<name>', "
              "'init:<pi|ntk|yarn|llama3>', ...",
    "warning": "one sentence on why the method is not a plain 'search', when it is not",
    "source": "the model the factors were made for (folder or Hub id)",
    "data": "documents used (paths or dataset ids)",
    "documents": "number of documents evaluated per candidate",
    "eval_length": "tokens per document in the fitness",
    "evaluations": "number of perplexity evaluations",
    "best_perplexity": "fitness of the chosen factors",
    "baseline_perplexities": "fitness of the analytic sets on the same data",
    "preset": "search preset",
    "budget": "search budget (evaluations, seconds)",
    "seed": "random seed",
    "base_factors": "factors of an earlier stage that these compose with",
    "tool_version": "longrope-convert version",
    "created": "UTC timestamp",
    "notes": "free text",
}


class FactorFileError(LongRoPEError):
    """A factor file that is not valid; the message names the file and the field."""


@dataclass(frozen=True)
class ModelFingerprint:
    """What a factor set was made for. `name` is informative; the rest must match to reuse a set."""

    architecture: str
    name: str
    head_dim: int
    rope_theta: float
    original_max_position_embeddings: int
    num_hidden_layers: int
    hidden_size: int

    def matches(self, other: ModelFingerprint) -> bool:
        mine, theirs = asdict(self), asdict(other)
        mine.pop("name"), theirs.pop("name")
        return mine == theirs


@dataclass
class FactorSet:
    model: ModelFingerprint
    target_length: int
    long_factor: list[float]
    short_factor: list[float]
    n_hat: int = 0
    long_mscale: float = 1.0
    short_mscale: float = 1.0
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.target_length / self.model.original_max_position_embeddings

    @property
    def method(self) -> str:
        return self.provenance.get("method", "unknown")

    @property
    def is_searched(self) -> bool:
        """Found by an evolutionary search that evolved and beat every baseline it measured."""
        return self.method in ("search", "search:short")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": asdict(self.model),
            "target_length": self.target_length,
            "long_factor": list(self.long_factor),
            "short_factor": list(self.short_factor),
            "n_hat": self.n_hat,
            "long_mscale": self.long_mscale,
            "short_mscale": self.short_mscale,
            "provenance": self.provenance,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the file atomically (outputs.write_text_atomically)."""
        write_text_atomically(Path(path), self.dumps())


def load_factor_set(path: str | Path) -> FactorSet:
    """Read and strictly validate a factor file; any problem raises FactorFileError naming file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FactorFileError(f"{path}: no such factor file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FactorFileError(f"{path}: not a readable JSON file ({error})") from None
    return factor_set_from_json(data, origin=str(path))


def factor_set_from_json(data: Any, origin: str = "<factors>") -> FactorSet:
    def fail(field_name: str, problem: str) -> None:
        raise FactorFileError(f"{origin}: field '{field_name}': {problem}")

    if not isinstance(data, dict):
        fail("<top level>", "must be a JSON object")
    expected = {"format", "version", "model", "target_length", "long_factor", "short_factor", "n_hat",
                "long_mscale", "short_mscale", "provenance"}
    _check_keys(data, expected, expected, "", fail)
    if data["format"] != FORMAT:
        fail("format", f"must be '{FORMAT}', got {data['format']!r}")
    if data["version"] != VERSION:
        fail("version", f"unsupported version {data['version']!r} (this tool reads {VERSION})")

    model_fields = {"architecture": str, "name": str, "head_dim": int, "rope_theta": (int, float),
                    "original_max_position_embeddings": int, "num_hidden_layers": int, "hidden_size": int}
    model = data["model"]
    if not isinstance(model, dict):
        fail("model", "must be an object")
    _check_keys(model, set(model_fields), set(model_fields), "model.", fail)
    for name, kind in model_fields.items():
        value = model[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            fail(f"model.{name}", f"wrong type {type(value).__name__}")
        if name != "architecture" and name != "name" and not value > 0:
            fail(f"model.{name}", f"must be positive, got {value}")
    if model["head_dim"] % 2:
        fail("model.head_dim", f"must be even, got {model['head_dim']}")
    fingerprint = ModelFingerprint(**{**model, "rope_theta": float(model["rope_theta"])})

    target = data["target_length"]
    if isinstance(target, bool) or not isinstance(target, int):
        fail("target_length", "must be an integer")
    if target <= fingerprint.original_max_position_embeddings:
        fail("target_length", f"{target} must exceed the original window {fingerprint.original_max_position_embeddings}")

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
    for i in range(1, half):
        if factors["long_factor"][i] < factors["long_factor"][i - 1]:
            fail(f"long_factor[{i}]", f"must be non-decreasing, got {factors['long_factor'][i]} after "
                                      f"{factors['long_factor'][i - 1]}")

    n_hat = data["n_hat"]
    if isinstance(n_hat, bool) or not isinstance(n_hat, int) or n_hat < 0:
        fail("n_hat", f"must be a non-negative integer, got {n_hat!r}")
    if n_hat >= fingerprint.original_max_position_embeddings:
        fail("n_hat", f"{n_hat} must be below the original window")
    for name in ("long_mscale", "short_mscale"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            fail(name, f"must be a positive finite number, got {value!r}")

    provenance = data["provenance"]
    if not isinstance(provenance, dict):
        fail("provenance", "must be an object")
    _check_keys(provenance, set(PROVENANCE_FIELDS), {"method"}, "provenance.", fail)
    if not isinstance(provenance["method"], str) or not provenance["method"]:
        fail("provenance.method", "must be a non-empty string")

    return FactorSet(
        model=fingerprint,
        target_length=target,
        long_factor=factors["long_factor"],
        short_factor=factors["short_factor"],
        n_hat=n_hat,
        long_mscale=float(data["long_mscale"]),
        short_mscale=float(data["short_mscale"]),
        provenance=provenance,
    )


def _check_keys(data: dict, allowed: set, required: set, prefix: str, fail) -> None:
    for key in data:
        if key not in allowed:
            fail(f"{prefix}{key}", "unknown field")
    for key in sorted(required - set(data)):
        fail(f"{prefix}{key}", "missing")


def new_provenance(method: str, **fields: Any) -> dict[str, Any]:
    return {
        "method": method,
        **fields,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def analytic_factor_set(method: str, model: ModelFingerprint, target_length: int) -> FactorSet:
    """A classic method expressed as a LongRoPE factor set (long set; the short set is the identity)."""
    if method not in ANALYTIC_METHODS:
        raise LongRoPEError(f"unknown factor method '{method}' (choose one of {', '.join(ANALYTIC_METHODS)})")
    L, dim, base = model.original_max_position_embeddings, model.head_dim, model.rope_theta
    scale = target_length / L
    half = dim // 2
    long_mscale = 1.0
    if method == "pi":
        long_factor = [scale] * half
    elif method == "ntk":
        long_factor = [scale ** (2 * i / (dim - 2)) for i in range(half)]
    elif method == "yarn":
        long_factor = yarn_factors(scale, dim, base, L)
        long_mscale = 0.1 * math.log(scale) + 1.0
    else:
        long_factor = llama3_factors(scale, dim, base, L)
    # Float rounding must not break the non-decreasing rule the file format enforces.
    long_factor = [max(1.0, f) for f in long_factor]
    for i in range(1, half):
        long_factor[i] = max(long_factor[i], long_factor[i - 1])
    return FactorSet(
        model=model,
        target_length=target_length,
        long_factor=long_factor,
        short_factor=[1.0] * half,
        n_hat=0,
        long_mscale=long_mscale,
        short_mscale=1.0,
        # No timestamp: the same inputs give a byte-identical file (and an unchanged push).
        provenance={"method": f"init:{method}", "tool_version": __version__},
    )


def yarn_factors(scale: float, dim: int, base: float, original_length: int,
                 beta_fast: float = 32, beta_slow: float = 1) -> list[float]:
    """LongRoPE's official YaRN init: lambda ramps linearly from 1 (fast dims) to s (slow dims)."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    factors = []
    for i in range(dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolate = 1.0 - ramp
        factors.append(scale * (1.0 - extrapolate) + extrapolate)
    return factors


def llama3_factors(scale: float, dim: int, base: float, original_length: int,
                   low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> list[float]:
    """transformers' llama3 rope type as per-dimension factors."""
    factors = []
    for i in range(dim // 2):
        wavelength = 2 * math.pi * base ** (2 * i / dim)
        if wavelength < original_length / high_freq_factor:
            factors.append(1.0)
        elif wavelength > original_length / low_freq_factor:
            factors.append(scale)
        else:
            smooth = (original_length / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1.0 - smooth) / scale + smooth))
    return factors


def shipped_factor_dir() -> Path:
    """Where the `factors/` folder of this project is: in the installed wheel, else in the source checkout."""
    try:
        return Path(str(resources.files("longrope_convert.shipped_factors")))
    except ModuleNotFoundError:  # source checkout or editable install: the folder sits next to the package
        return Path(__file__).resolve().parent.parent / "factors"


def find_shipped_factor_set(model: ModelFingerprint, target_length: int,
                            directory: Path | None = None) -> tuple[FactorSet, Path] | None:
    """The shipped factor file made for this model fingerprint and target length, if there is one."""
    directory = directory or shipped_factor_dir()
    if not directory.is_dir():
        return None
    for path in sorted(directory.rglob("*.json")):
        factor_set = load_factor_set(path)
        if factor_set.target_length == target_length and factor_set.model.matches(model):
            return factor_set, path
    return None
