"""GGUF rewrite wall time and peak RSS, against `cp` of the same file and gguf's own metadata rewriter.

    python benchmarks/gguf_rewrite.py [--work DIR] [--repeats 3]

Files: SmolLM2-135M-Instruct Q4_1 (98 MB, the test suite's) and synthetic Llama-3-8B-shaped Q4_0
GGUFs (hidden 4096, random bytes as weights, a 128,256-token vocabulary and 280,000 merges, like
Llama 3's metadata) with 32 layers (4.5 GB) and with 2 layers (0.8 GB, the same metadata), made once
in the work folder with gguf's streaming writer.
Each command runs as its own process under /usr/bin/time, after the source was read once (warm page
cache), output on the same file system. `gguf-new-metadata` is the gguf package's script that
rewrites a file's metadata (it copies tensors through numpy memory maps); the last command only
opens the file with gguf's reader, the part of the rewrite that depends on the metadata. Prints a
Markdown table (median wall time, largest peak RSS of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from model_cache import smollm2_gguf  # noqa: E402
from timed_command import time_command

HIDDEN, FEED_FORWARD, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256
READ_ONLY = "import sys, gguf; gguf.GGUFReader(sys.argv[1])"


def synthetic_gguf(path: Path, layers: int) -> Path:
    """A Llama-3-8B-shaped Q4_0 GGUF (with `layers` layers) of random weights, written tensor by tensor."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_context_length(8192)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"token{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges([f"m{i} n{i}" for i in range(280_000)])
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
    for layer in range(layers):
        shapes.update({
            f"blk.{layer}.attn_norm.weight": (HIDDEN,), f"blk.{layer}.ffn_norm.weight": (HIDDEN,),
            f"blk.{layer}.attn_q.weight": (HEADS * head_dim, HIDDEN),
            f"blk.{layer}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{layer}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{layer}.attn_output.weight": (HIDDEN, HEADS * head_dim),
            f"blk.{layer}.ffn_gate.weight": (FEED_FORWARD, HIDDEN),
            f"blk.{layer}.ffn_up.weight": (FEED_FORWARD, HIDDEN),
            f"blk.{layer}.ffn_down.weight": (HIDDEN, FEED_FORWARD),
        })
    # Matrices in Q4_0 (raw bytes), norms in F32, as a quantized Llama GGUF has them.
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    for name, shape in shapes.items():
        if len(shape) == 2:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, q4_0)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=q4_0)
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    generator = np.random.default_rng(0)
    for shape in shapes.values():
        if len(shape) == 2:
            writer.write_tensor_data(generator.integers(0, 256, gguf.quant_shape_to_byte_shape(shape, q4_0),
                                                        dtype=np.uint8))
        else:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
    writer.close()
    partial.rename(path)
    return path


def measure(command: list[str], output: Path, repeats: int) -> tuple[float, float]:
    """Median wall seconds and largest peak RSS (MB) of a command, with `output` removed before each run."""
    times, peaks = [], []
    for _ in range(repeats):
        output.unlink(missing_ok=True)
        wall, peak = time_command(command)
        times.append(wall)
        peaks.append(peak)
    output.unlink(missing_ok=True)
    return statistics.median(times), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/longrope-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cli = str(Path(sys.executable).parent / "longrope-convert")
    new_metadata = [sys.executable, "-m", "gguf.scripts.gguf_new_metadata"]
    rows = []
    files = [("SmolLM2-135M-Instruct Q4_1", smollm2_gguf()),
             ("synthetic Llama-3-8B shape, 2 layers, Q4_0", synthetic_gguf(args.work / "synthetic-2-layers.gguf", 2)),
             ("synthetic Llama-3-8B shape, Q4_0", synthetic_gguf(args.work / "synthetic-8b.Q4_0.gguf", 32))]
    for label, source in files:
        size = source.stat().st_size / 1e9
        subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)  # warm page cache
        out = args.work / "out.gguf"
        commands = {
            "cp": ["cp", str(source), str(out)],
            "longrope-convert gguf": [cli, "gguf", str(source), "--factors", "yarn", "--target", "32768",
                                      "--output", str(out)],
            "gguf-new-metadata (gguf package)": [*new_metadata, str(source), str(out), "--general-name", "x",
                                                 "--force"],
            "gguf.GGUFReader alone (reads the metadata)": [sys.executable, "-c", READ_ONLY, str(source)],
        }
        for name, command in commands.items():
            wall, peak = measure(command, out, args.repeats)
            rows.append((label, f"{size:.2f}", name, wall, peak))
            print(rows[-1], file=sys.stderr, flush=True)
    print("| file | GB | command | wall s | peak RSS MB |\n|---|---|---|---|---|")
    for label, size, name, wall, peak in rows:
        print(f"| {label} | {size} | {name} | {wall:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
