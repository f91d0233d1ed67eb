"""The search log: a JSONL file with a header line, then one line per (setting, document) evaluation.

Every evaluation is appended as it finishes. A resumed search replays the logged evaluations
instead of recomputing them, so it ends where the uninterrupted search would have; the header
must match the resumed search's settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import LongRoPEError
from .workers import Workers

LOG_VERSION = 1


class SearchLog:
    """JSONL: a header with the search's settings, then one line per (setting, document) evaluation."""

    def __init__(self, path: Path, header: dict[str, Any], resume: bool, workers: Workers) -> None:
        self.path, self.writer = path, workers.is_main
        self.known: dict[tuple[str, int], tuple[float, int]] = {}
        header = json.loads(json.dumps(header))  # tuples become lists, as when read back
        if resume:
            self._replay(header)
        elif path.exists():
            raise LongRoPEError(f"search log '{path}' exists; pass --resume {path} to continue it, or remove it")
        workers.barrier()  # every rank has looked at the log before rank 0 writes it
        if self.writer and not resume:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"kind": "header", **header}) + "\n")

    def _replay(self, header: dict[str, Any]) -> None:
        try:
            lines = self.path.read_text().splitlines()
            logged = json.loads(lines[0])
        except (OSError, IndexError, ValueError):
            raise LongRoPEError(f"--resume {self.path}: not a search log") from None
        logged.pop("kind", None)
        for field, value in header.items():
            if field != "budget" and logged.get(field) != value:
                raise LongRoPEError(f"--resume {self.path}: the log was made with a different '{field}' "
                                    f"({logged.get(field)!r}); resume with the same settings")
        self.known.update(logged_evaluations(lines[1:]))

    def append(self, setting: str, doc: int, nll_sum: float, tokens: int, seconds: float) -> None:
        self.known[(setting, doc)] = (nll_sum, tokens)
        if self.writer:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"kind": "eval", "setting": setting, "doc": doc, "nll_sum": nll_sum,
                                         "tokens": tokens, "seconds": round(seconds, 3)}) + "\n")


def logged_evaluations(lines: list[str]) -> dict[tuple[str, int], tuple[float, int]]:
    """(setting, document) -> (NLL sum, tokens) from a search log's evaluation lines."""
    known = {}
    for line in lines:
        try:
            entry = json.loads(line)
            known[(entry["setting"], entry["doc"])] = (entry["nll_sum"], entry["tokens"])
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by a kill: the evaluation in flight is recomputed
    return known
