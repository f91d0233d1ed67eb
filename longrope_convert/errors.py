"""The exception types the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


# The Python API's argument names that messages may name, as placeholders `{name}` (never a path's own braces).
SETTINGS = frozenset({"target", "factors", "revision", "output", "overwrite", "out", "log", "resume", "convert_to",
                      "data", "short", "space", "push_to", "lengths", "needle_lengths", "passkey_lengths", "needles",
                      "stride", "beyond_target", "baselines", "device_map", "gguf", "preset", "objective",
                      "needle_task"})
PLACEHOLDER = re.compile(r"\{(" + "|".join(sorted(SETTINGS)) + r")\}")


class LongRoPEError(Exception):
    """A problem with the user's input or environment, explained in one line.

    An error about one setting carries it as data: `setting` (the argument's name in the Python API, e.g.
    "target"), the `value` given, the `bound` it breaks and the `file` it concerns, when there is one. Its message
    names settings through placeholders, `{target}` (SETTINGS): str() writes the argument's name, and the command
    line its flag (`worded`).
    """

    def __init__(self, message: str, *, setting: str | None = None, value: Any = None, bound: Any = None,
                 file: str | Path | None = None) -> None:
        super().__init__(message)
        self.message, self.setting, self.value, self.bound, self.file = message, setting, value, bound, file

    def worded(self, names: Mapping[str, str] | None = None) -> str:
        """The message, each setting named as `names` spells it (the CLI: {"target": "--target", ...}), else by
        its argument name."""
        if self.setting is None:  # no placeholders: braces are the message's own
            return self.message
        return PLACEHOLDER.sub(lambda found: (names or {}).get(found[1], found[1]), self.message)

    def __str__(self) -> str:
        return self.worded()


class TargetError(LongRoPEError):
    """A target length (tokens) that cannot be reached: within the length the source already serves, beyond
    what float32 positions hold exactly, or not the one a factor file was made for. `bound` is that length."""


class SourceError(LongRoPEError):
    """The source checkpoint cannot be converted as it is: a file missing or corrupt, a tensor the
    architecture needs absent or of the wrong shape."""


class OutputError(LongRoPEError):
    """A place to write that would harm the user's files or cannot be written: inside the source, a folder
    this tool did not write, a read-only folder."""


class DataError(LongRoPEError):
    """--data that cannot be read as documents; the message names the file and line, or the dataset."""


class EvaluationError(LongRoPEError):
    """An evaluation that cannot be measured as asked (a length, stride or passkey size out of bounds); for a length
    or stride, `setting` is the argument ("lengths", "needle_lengths", "passkey_lengths", "stride"), `value` the
    number given and `bound` the limit it breaks."""


class HubError(LongRoPEError):
    """A refusal or failure of the Hugging Face Hub, with what to do about it."""


class RopeScalingError(LongRoPEError):
    """A source's RoPE scaling that LongRoPE cannot compose with: a type whose frequencies are not fixed per
    dimension (dynamic), an unknown type, or parameters missing or out of range."""
