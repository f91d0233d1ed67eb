"""How exact is cached generation across the original window? Stock vs key re-rotation vs cache rebuild.

    python benchmarks/kv_switch_accuracy.py

SmolLM2-135M with its window declared as 512 tokens (same weights; a small window makes the full
recomputes cheap), converted to 1024 with the YaRN init. Greedy generation of 10 tokens after a
508-token prompt; at every step the cached logits are compared with a forward of the whole sequence
without cache (relative max error). Three ways to handle the switch from the short to the long set:
  stock transformers `longrope`  keeps the short-set keys and values in the cache
  key re-rotation                rotates the cached keys by the difference of angles (exact for layer 0)
  cache rebuild (ours)           recomputes the prefix's keys and values with the long set
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from longrope_convert.convert import write_checkpoint
from longrope_convert.factors import analytic_factor_set
from longrope_convert.perplexity import document_ids
from longrope_convert.source import read_source
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from model_cache import smollm2_folder  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sherlock_holmes_excerpt.txt"


def rerotate_instead_of_rebuild(model) -> None:
    """Swap the cache rebuild for a re-rotation of the cached keys (the cheap, inexact alternative)."""
    backbone = model.model
    rotary = backbone.rotary_emb

    def rerotate(cache, rows, new_long, past_length, seen):
        positions = seen.position_ids[rows, :past_length]
        old_set, new_set = [], []
        for long_rows, angles_out in ((~new_long[rows], old_set), (new_long[rows], new_set)):
            angles, mscale = rotary.angles_and_mscale(positions, long_rows[:, None])
            angles_out += [angles.double(), mscale.double()]
        delta = torch.cat([new_set[0] - old_set[0]] * 2, dim=-1)
        ratio = (new_set[1] / old_set[1])[..., None]  # [rows, 1, 1]
        cos, sin = (delta.cos() * ratio).float()[:, None], (delta.sin() * ratio).float()[:, None]
        for layer in cache.layers:
            keys = layer.keys[rows, :, :past_length]
            half = keys.shape[-1] // 2
            rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
            layer.keys[rows, :, :past_length] = keys * cos + rotated * sin

    backbone._rebuild_cache_rows = rerotate


@torch.inference_mode()
def errors(model, ids, steps=10) -> list[float]:
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    result = []
    for step, logits in enumerate(out.logits):
        reference = model(out.sequences[:, : ids.shape[1] + step]).logits[:, -1]
        result.append(((logits - reference).abs().max() / reference.abs().max()).item())
    return result


def main() -> None:
    work = Path(tempfile.mkdtemp())
    source_dir = smollm2_folder()
    shrunk = work / "smollm2-512"
    shutil.copytree(source_dir, shrunk, copy_function=os.link)
    config = json.loads((source_dir / "config.json").read_text())
    (shrunk / "config.json").unlink()
    (shrunk / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    source = read_source(shrunk)
    write_checkpoint(source, analytic_factor_set("yarn", source.fingerprint, 1024), work / "out", "init:yarn")
    ids = document_ids(AutoTokenizer.from_pretrained(shrunk), TEXT.read_text(), 508)

    stock = LlamaForCausalLM.from_pretrained(work / "out", dtype=torch.float32)
    rebuild = AutoModelForCausalLM.from_pretrained(work / "out", trust_remote_code=True, dtype=torch.float32)
    rerotation = AutoModelForCausalLM.from_pretrained(work / "out", trust_remote_code=True, dtype=torch.float32)
    rerotate_instead_of_rebuild(rerotation)
    print("| handling of the switch | max error before (steps 1-5) | error after (steps 6-10) |\n|---|---|---|")
    for name, model in (("stock transformers longrope", stock), ("key re-rotation", rerotation),
                        ("cache rebuild (ours)", rebuild)):
        found = errors(model, ids)  # step 6 sees 513 tokens: the first beyond the window
        print(f"| {name} | {max(found[:5]):.1e} | {min(found[5:]):.1e} - {max(found[5:]):.1e} |", flush=True)


if __name__ == "__main__":
    main()
