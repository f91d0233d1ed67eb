"""What stock transformers reads from a converted checkpoint, without remote code; run as a script under other
releases (python tests/reader_probe.py FOLDER WINDOW prints JSON).

For a row that fits the window and one a token longer: the rotary frequencies used (the angle at position 1)
and the attention scale (the length of (cos, sin)); every warning logged while loading; and what loading with
the shipped modeling code (trust_remote_code=True) gives, with the warnings logged then.
"""

import json
import logging
import sys
import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM


def load_logging_warnings(folder: str, **kwargs) -> tuple[object, list[str]]:
    """from_pretrained(folder, **kwargs) and every warning transformers logged or Python warned meanwhile."""
    logged = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    return model, logged + [str(w.message) for w in caught]


def read_checkpoint(folder: str, window: int) -> dict:
    model, logged = load_logging_warnings(folder)

    def rotary(length: int) -> dict:
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(length)[None])
        half = cos.shape[-1] // 2
        return {"inv_freq": torch.atan2(sin[0, 1, :half], cos[0, 1, :half]).tolist(),
                "attention_scale": torch.hypot(sin[0, 1, 0], cos[0, 1, 0]).item()}

    try:
        remote_code_warnings = load_logging_warnings(folder, trust_remote_code=True)[1]
        remote_code = "loaded"
    except ImportError as error:
        remote_code, remote_code_warnings = str(error), None
    return {"version": transformers.__version__, "class": type(model).__name__, "warnings": logged,
            "short": rotary(window), "long": rotary(window + 1), "remote_code": remote_code,
            "remote_code_warnings": remote_code_warnings}


if __name__ == "__main__":
    print(json.dumps(read_checkpoint(sys.argv[1], int(sys.argv[2]))))
