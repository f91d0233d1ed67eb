"""The exception types the command line turns into a one-line message and a non-zero exit."""


class LongRoPEError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class SourceError(LongRoPEError):
    """The source checkpoint cannot be converted as it is: a file missing or corrupt, a tensor the
    architecture needs absent or of the wrong shape."""


class OutputError(LongRoPEError):
    """A place to write that would harm the user's files or cannot be written: inside the source, a folder
    this tool did not write, a read-only folder."""


class DataError(LongRoPEError):
    """--data that cannot be read as documents; the message names the file and line, or the dataset."""


class EvaluationError(LongRoPEError):
    """An evaluation that cannot be measured as asked (a length, stride or passkey size out of bounds)."""


class HubError(LongRoPEError):
    """A refusal or failure of the Hugging Face Hub, with what to do about it."""


class RopeScalingError(LongRoPEError):
    """A source's RoPE scaling that LongRoPE cannot compose with: a type whose frequencies are not fixed per
    dimension (dynamic), an unknown type, or parameters missing or out of range."""
