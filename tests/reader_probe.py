"""What stock transformers reads from a converted checkpoint, without remote code; run as a script under other
releases (python tests/reader_probe.py FOLDER WINDOW prints JSON).

For a row that fits the window and one a token longer: the rotary frequencies used (the angle at position 1)
and the attention scale (the length of (cos, sin)); every warning logged while loading; and what loading with
the shipped modeling code (trust_remote_code=True) gives.
"""

import json
import logging
import sys
import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM


def read_checkpoint(folder: str, window: int) -> dict:
    logged = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModelForCausalLM.from_pretrained(folder)
    finally:
        logging.getLogger("transformers").removeHandler(handler)

    def rotary(length: int) -> dict:
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(length)[None])
        half = cos.shape[-1] // 2
        return {"inv_freq": torch.atan2(sin[0, 1, :half], cos[0, 1, :half]).tolist(),
                "attention_scale": torch.hypot(sin[0, 1, 0], cos[0, 1, 0]).item()}

    try:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        remote_code = "loaded"
    except ImportError as error:
        remote_code = str(error)
    return {"version": transformers.__version__, "class": type(model).__name__,
            "warnings": logged + [str(w.message) for w in caught],
            "short": rotary(window), "long": rotary(window + 1), "remote_code": remote_code}


if __name__ == "__main__":
    print(json.dumps(read_checkpoint(sys.argv[1], int(sys.argv[2]))))
