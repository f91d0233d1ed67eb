"""Conversion wall time and peak RSS, against `cp -r` and a naive from_pretrained().save_pretrained().

    python benchmarks/conversion.py [--work DIR] [--repeats 3]

Checkpoints: SmolLM2-135M (538 MB fp32, one file) and a synthetic ~4.2 GB Llama in 5 shards (random
weights, made once in the work folder). Each command runs as its own process under /usr/bin/time;
the source is read once before, so every command starts from a warm page cache. Each repeat runs
every command in turn (drift on a shared machine hits all alike). Prints a Markdown table (median
of the repeats).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from model_cache import smollm2_folder  # noqa: E402
from timed_command import time_command

SYNTHETIC = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)


def synthetic_checkpoint(folder: Path) -> Path:
    """A Llama config and ~4.2 GB of fp32 random weights in ~1 GB shards with an index."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    c = SYNTHETIC
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": [c["vocab_size"], c["hidden_size"]],
              "model.norm.weight": [c["hidden_size"]], "lm_head.weight": [c["vocab_size"], c["hidden_size"]]}
    for layer in range(c["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": [c["num_attention_heads"] * head_dim, c["hidden_size"]],
            prefix + "self_attn.k_proj.weight": [c["num_key_value_heads"] * head_dim, c["hidden_size"]],
            prefix + "self_attn.v_proj.weight": [c["num_key_value_heads"] * head_dim, c["hidden_size"]],
            prefix + "self_attn.o_proj.weight": [c["hidden_size"], c["num_attention_heads"] * head_dim],
            prefix + "mlp.gate_proj.weight": [c["intermediate_size"], c["hidden_size"]],
            prefix + "mlp.up_proj.weight": [c["intermediate_size"], c["hidden_size"]],
            prefix + "mlp.down_proj.weight": [c["hidden_size"], c["intermediate_size"]],
            prefix + "input_layernorm.weight": [c["hidden_size"]],
            prefix + "post_attention_layernorm.weight": [c["hidden_size"]],
        })
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = shape
        size += 4 * torch.Size(shape).numel()
        if size > 1_000_000_000:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shard.items()}
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0,
              "rope_scaling": None, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
              "bos_token_id": 1, "eos_token_id": 2, **c}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


NAIVE = ("import sys, torch; from transformers import AutoModelForCausalLM; "
         "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).save_pretrained(sys.argv[2])")


def measure(command: list[str], output: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run of a command, with `output` removed before and after."""
    shutil.rmtree(output, ignore_errors=True)
    measured = time_command(command)
    shutil.rmtree(output, ignore_errors=True)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/longrope-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cli = str(Path(sys.executable).parent / "longrope-convert")
    rows = []
    for label, source, target in [("SmolLM2-135M (538 MB, 1 file)", smollm2_folder(), 65536),
                                  ("synthetic Llama (4.2 GB, 5 shards)", synthetic_checkpoint(args.work / "synthetic"),
                                   32768)]:
        size = sum(p.stat().st_size for p in source.iterdir()) / 1e9
        subprocess.run(["cat", *map(str, source.iterdir())], stdout=subprocess.DEVNULL, check=True)  # warm cache
        out = args.work / "out"
        commands = {
            "cp -r": ["cp", "-r", str(source), str(out)],
            "longrope-convert (hard links)": [cli, str(source), "--target", str(target), "--factors", "yarn",
                                              "--output", str(out)],
            "longrope-convert --copy-weights": [cli, str(source), "--target", str(target), "--factors", "yarn",
                                                "--output", str(out), "--copy-weights"],
            "from_pretrained().save_pretrained()": [sys.executable, "-c", NAIVE, str(source), str(out)],
        }
        runs = {name: [] for name in commands}
        for repeat in range(args.repeats):  # each repeat runs every command in turn: drift hits all alike
            for name, command in commands.items():
                if repeat == 0 or not name.startswith("from_pretrained"):  # the slow naive way once
                    runs[name].append(measure(command, out))
                    print(label, name, runs[name][-1], file=sys.stderr, flush=True)
        for name, measured in runs.items():
            rows.append((label, f"{size:.2f}", name, statistics.median(wall for wall, _ in measured),
                         max(peak for _, peak in measured)))
    print("| checkpoint | GB | method | wall s | peak RSS MB |\n|---|---|---|---|---|")
    for label, size, name, wall, peak in rows:
        print(f"| {label} | {size} | {name} | {wall:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
