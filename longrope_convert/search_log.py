"""The search log: a JSONL file with a header line, then one line per (setting, document) evaluation.

Every evaluation is appended as it finishes. A resumed search replays the logged evaluations
instead of recomputing them, so it ends where the uninterrupted search would have. For that the
header must match the resumed search: its settings, and content hashes of what the evaluations
depend on (each document's tokens, the model's config and weight files), so a resume on edited
data or another model is refused, naming what changed. A kill can cut the last line short; a
resume drops that fragment before appending. Rank 0 alone reads and writes the file; the other
ranks receive what it read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import LongRoPEError
from .evolution import NLL
from .workers import Workers

LOG_VERSION = 2  # 2: content hashes of documents, config and weights in the header
HASH_BLOCK = 16 * 2**20  # bytes read at a time: hashing a multi-GB weight file keeps memory flat


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, streamed (~1.3 GB/s on one core of the development machine)."""
    digest, block = hashlib.sha256(), bytearray(HASH_BLOCK)
    view = memoryview(block)
    with open(path, "rb") as handle:
        while read := handle.readinto(block):
            digest.update(view[:read])
    return digest.hexdigest()


def tokens_sha256(input_ids: torch.Tensor) -> str:
    """SHA-256 of token ids as little-endian int64: what a document is to the fitness."""
    return hashlib.sha256(input_ids.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()


def config_sha256(config: dict[str, Any]) -> str:
    """SHA-256 of a config as canonical JSON (key order and spacing do not count)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


class SearchLog:
    """JSONL: a header with the search's settings and fingerprints, then one line per (setting, document)
    evaluation. `header` is a function, called on rank 0 only (it may hash gigabytes of weights)."""

    def __init__(self, path: Path, header: Callable[[], dict[str, Any]], resume: bool, workers: Workers) -> None:
        self.path, self.writer = path, workers.is_main
        outcome: tuple[str, Any] = ("", None)
        if workers.is_main:
            try:
                outcome = ("known", self._open(json.loads(json.dumps(header())), resume))  # tuples become lists
            except LongRoPEError as error:
                outcome = ("error", error)  # pickled whole to the other processes: its data with it
        kind, value = workers.from_main(outcome)
        if kind == "error":
            raise value
        self.known: dict[tuple[str, int], NLL] = value

    @property
    def _about(self) -> dict[str, Any]:
        """A refused log's error data: resume's, the log."""
        return {"setting": "resume", "value": str(self.path), "file": self.path}

    def _open(self, header: dict[str, Any], resume: bool) -> dict[tuple[str, int], NLL]:
        """Check (resume) or write (new search) the log; the evaluations it holds."""
        if not resume:
            if self.path.exists():
                raise LongRoPEError(f"search log '{self.path}' exists; pass {{resume}} {self.path} to continue it, "
                                    "or remove it", setting="log", value=str(self.path), file=self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"kind": "header", **header}) + "\n")
            return {}
        try:
            content = self.path.read_bytes()
            logged = json.loads(content.split(b"\n", 1)[0])
        except (OSError, ValueError):
            raise LongRoPEError(f"{{resume}} {self.path}: not a search log", **self._about) from None
        if not isinstance(logged, dict) or logged.get("kind") != "header":
            raise LongRoPEError(f"{{resume}} {self.path}: not a search log", **self._about)
        if logged.get("version") != header["version"]:
            raise LongRoPEError(f"{{resume}} {self.path}: log version {logged.get('version')!r} was written by "
                                f"another release (this one writes {header['version']}); start a new search",
                                **self._about)
        changed = header_difference(logged, header)
        if changed:
            raise LongRoPEError(f"{{resume}} {self.path}: {changed} since the log was written; "
                                "resume with the same data, model and settings, or start a new log", **self._about)
        known, complete = read_evaluations(content, self.path)
        if complete < len(content):  # a line cut short by a kill: drop it before appending
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)
        return known

    def append(self, setting: str, doc: int, nll_sum: float, tokens: int, seconds: float) -> None:
        self.known[(setting, doc)] = (nll_sum, tokens)
        if self.writer:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"kind": "eval", "setting": setting, "doc": doc, "nll_sum": nll_sum,
                                         "tokens": tokens, "seconds": round(seconds, 3)}) + "\n")


def header_difference(logged: dict[str, Any], header: dict[str, Any]) -> str:
    """What differs between a logged header and the resumed search's, in words ("" when nothing does);
    the budget may change between runs."""
    for field in ("mode", "target_length", "eval_length", "objective"):  # these change the documents' tokens too
        if logged.get(field) != header.get(field):
            return _setting_changed(field, logged.get(field), header.get(field))
    logged_documents, documents = logged.get("documents") or [], header["documents"]
    if [d.get("name") for d in logged_documents] != [d["name"] for d in documents]:
        return f"the documents changed (the log has {[d.get('name') for d in logged_documents]})"
    for before, now in zip(logged_documents, documents):
        if before.get("tokens_sha256") != now["tokens_sha256"]:
            return f"document '{now['name']}' changed (its tokens differ)"
    logged_model, model = logged.get("model_files") or {}, header["model_files"]
    if logged_model.get("config_sha256") != model["config_sha256"]:
        return "the model's config changed"
    weights, logged_weights = model["weights_sha256"], logged_model.get("weights_sha256") or {}
    for name in sorted(set(weights) | set(logged_weights)):
        if logged_weights.get(name) != weights.get(name):
            return f"the model's weights changed ({name})"
    for field in {**logged, **header}:  # a setting absent from one side (the perplexity objective's) differs too
        if field not in ("kind", "budget", "documents", "model_files") and logged.get(field) != header.get(field):
            return _setting_changed(field, logged.get(field), header.get(field))
    return ""


def _setting_changed(field: str, logged: Any, now: Any) -> str:
    """A changed setting in words; of settings that are objects (the needle objective's), the first part that
    differs, and an absent one as the perplexity objective's."""
    if isinstance(logged, dict) and isinstance(now, dict):
        part = next(key for key in {**logged, **now} if logged.get(key) != now.get(key))
        return f"the setting '{field}' changed (its '{part}' was {logged.get(part)!r}, now {now.get(part)!r})"
    if field == "objective":
        logged, now = ((value or {}).get("name", "ppl") for value in (logged, now))
    return f"the setting '{field}' changed (the log has {logged!r}, this search {now!r})"


def read_evaluations(content: bytes, path: Path) -> tuple[dict[tuple[str, int], NLL], int]:
    """The evaluations in a log's bytes, and how many bytes hold complete lines. A kill while a line
    was written leaves it without its newline: that fragment is left out (its evaluation is
    recomputed). A complete line that is not an evaluation raises LongRoPEError."""
    *lines, fragment = content.split(b"\n")
    known = {}
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            known[(entry["setting"], entry["doc"])] = (entry["nll_sum"], entry["tokens"])
        except (ValueError, KeyError, TypeError):
            raise LongRoPEError(f"{{resume}} {path}: line {number} is not an evaluation record (the log was "
                                "edited or damaged); remove that line to resume", setting="resume", value=str(path),
                                file=path) from None
    return known, len(content) - len(fragment)


def logged_evaluations(path: Path) -> dict[tuple[str, int], NLL]:
    """(setting, document) -> (NLL sum, tokens) from a search log file."""
    return read_evaluations(path.read_bytes(), path)[0]
