"""The files of a checkpoint by what a conversion does with them: read from the source (so, for a Hub
source, download), copy, write, never read. Each list is kept once, here: what a Hub download fetches is
what conversion reads (tests/test_layout.py ties them), and what a push or --overwrite may replace is
what conversions write.

Names only: nothing here reads a file.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_PATTERNS = ("*.safetensors", SAFETENSORS_INDEX)
# Pickle weights run code when loaded: never downloaded, never read; a source that has only these is refused.
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "consolidated.*")
# Files of the source that travel with the weights (licences must: Llama's licence requires it).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json")
COPIED_PATTERNS = ("LICENSE*", "USE_POLICY*", "NOTICE*")
# What AutoTokenizer can build a tokenizer from: the fast tokenizer file, a sentencepiece model, or a byte-level
# BPE vocabulary with its merges.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
CARD_FILE = "README.md"  # the source's card is read for its licence; the output's is written
# Everything a conversion reads at the top of a source: the config, the weights, what travels with them and the
# card. A Hub source's download takes these and nothing else.
SOURCE_FILES = ("config.json", *WEIGHT_PATTERNS, *COPIED_FILES, *COPIED_PATTERNS, CARD_FILE)

MODELING_FILE = "modeling_longrope_llama.py"
FACTORS_FILE = "longrope_factors.json"  # the factor set, inside a converted checkpoint
EVAL_DIR = "eval"  # what `eval` writes inside a checkpoint
# What a conversion writes at the top of its folder: a push deletes the files of an earlier conversion that the
# folder does not have (shards replaced by one file, an old index); anything else in a repo is the user's.
CONVERSION_OUTPUTS = ("config.json", "*.safetensors", "*.safetensors.index.json", MODELING_FILE, FACTORS_FILE,
                      CARD_FILE, *COPIED_FILES, *COPIED_PATTERNS)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a file name matches one of the fnmatch `patterns` (case-sensitive, as on the Hub)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def pickle_files(names: Iterable[str]) -> list[str]:
    """Those of `names` that are pickle weights (PICKLE_PATTERNS)."""
    return [name for name in names if matches(name, PICKLE_PATTERNS)]


def has_tokenizer(names: Iterable[str]) -> bool:
    """Whether a checkpoint with these top-level file names has a tokenizer AutoTokenizer can load (TOKENIZER_FILES)."""
    names = set(names)
    return any(all(name in names for name in group) for group in TOKENIZER_FILES)


def is_conversion_output(path: str) -> bool:
    """Whether a path inside a checkpoint folder (or repo) is one a conversion or an evaluation writes."""
    if path.startswith(f"{EVAL_DIR}/"):
        return True
    return "/" not in path and matches(path, CONVERSION_OUTPUTS)
