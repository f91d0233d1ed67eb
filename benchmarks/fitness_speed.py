"""What one fitness evaluation costs beyond the backbone's forward pass, for a small and a Llama-3 vocabulary.

    python benchmarks/fitness_speed.py [--length 4096] [--rounds 5] [--threads 2] [--models smollm2 llama3-vocab]

Models, fp32 on the CPU, loaded as the search loads them (the LongRoPE model, YaRN init at 4x):
  SmolLM2-135M-Instruct   the real model (vocabulary 49,152, hidden 576)
  Llama-3 vocabulary      SmolLM2's shape with a 128,256-entry vocabulary, random weights (timing only)
Ways, on the same document of `--length` tokens (BOS + a book excerpt, repeated):
  backbone       model.model(ids): the transformer alone, no LM head
  token_nll      longrope_convert.perplexity.token_nll: backbone, then LM head and loss on flat
                 [positions, vocab] logits in chunks
  flat reference backbone, then the LM head over all positions at once and F.cross_entropy on the
                 flat [positions, vocab] logits (memory O(length x vocab))
  dcd7372 layout what token_nll did before: [batch, vocab, positions] logits (transpose(1, 2)), 256 at a time
  torch LCE      backbone, then torch.nn.functional.linear_cross_entropy with chunking options
                 (torch >= 2.13 only)
Every round times each way once, in turn, so drift on a shared machine hits all alike; medians of
the rounds. Values are checked too: every way's per-token NLL against the flat reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from longrope_convert.convert import longrope_config
from longrope_convert.factors import analytic_factor_set
from longrope_convert.perplexity import document_ids, load_longrope_model, token_nll
from longrope_convert.source import read_source
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from model_cache import smollm2_folder  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sherlock_holmes_excerpt.txt"
LLAMA3_VOCAB = 128_256


def llama3_vocabulary_model(smollm2: Path, folder: Path) -> Path:
    """SmolLM2's config with Llama-3's vocabulary size, random weights, saved to `folder`."""
    config = LlamaConfig.from_pretrained(smollm2)
    config.vocab_size = LLAMA3_VOCAB
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder: Path, target: int):
    source = read_source(folder)
    factor_set = analytic_factor_set("yarn", source.fingerprint, target)
    return load_longrope_model(folder, longrope_config(source.config, factor_set))


def backbone(model, ids):
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def flat_reference(model, ids):
    hidden = backbone(model, ids)[0, :-1]
    return F.cross_entropy(model.lm_head(hidden).float(), ids[0, 1:], reduction="none")


def dcd7372_layout(model, ids, chunk_size=256):
    hidden = backbone(model, ids)
    targets = ids[:, 1:]
    nll = torch.empty(targets.shape, dtype=torch.float32)
    for start in range(0, targets.shape[1], chunk_size):
        end = min(start + chunk_size, targets.shape[1])
        logits = model.lm_head(hidden[:, start:end]).float()
        nll[:, start:end] = F.cross_entropy(logits.transpose(1, 2), targets[:, start:end], reduction="none")
    return nll[0]


def torch_lce(model, ids):
    hidden = backbone(model, ids)[0, :-1]
    return F.linear_cross_entropy(hidden, model.lm_head.weight, ids[0, 1:], reduction="none",
                                  options=torch.nn.LinearCrossEntropyOptions())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=["smollm2", "llama3-vocab"], default=["smollm2", "llama3-vocab"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    smollm2 = smollm2_folder()
    text = TEXT.read_text()
    ids = document_ids(AutoTokenizer.from_pretrained(smollm2), text * (1 + 4 * args.length // len(text)), args.length)
    ways = {"backbone": backbone, "token_nll": lambda model, ids: token_nll(model, ids)[0],
            "flat reference": flat_reference, "dcd7372 layout": dcd7372_layout}
    if hasattr(F, "linear_cross_entropy"):
        ways["torch LCE"] = torch_lce
    work = Path(tempfile.mkdtemp())
    models = {}
    if "smollm2" in args.models:
        models["SmolLM2-135M (vocab 49,152)"] = smollm2
    if "llama3-vocab" in args.models:
        models["Llama-3 vocabulary (128,256), SmolLM2 shape"] = llama3_vocabulary_model(smollm2, work / "llama3-vocab")
    names = list(ways)
    print(f"| model | {' | '.join(f'{name} (s)' for name in names)} | token_nll / flat | token_nll / backbone "
          f"| dcd7372 / flat | max abs NLL difference to flat |\n|---|" + "---|" * (len(names) + 4))
    for label, folder in models.items():
        model = load(folder, 4 * args.length)
        with torch.inference_mode():
            reference = flat_reference(model, ids)
            difference = max((ways[name](model, ids) - reference).abs().max().item() for name in names[1:])
            seconds = {name: [] for name in names}
            for _ in range(args.rounds):
                for name in names:
                    started = time.perf_counter()
                    ways[name](model, ids)
                    seconds[name].append(time.perf_counter() - started)
                    print(f"{label}: {name} {seconds[name][-1]:.2f} s", file=sys.stderr, flush=True)
        median = {name: statistics.median(runs) for name, runs in seconds.items()}
        print(f"| {label} | {' | '.join(f'{median[name]:.2f}' for name in names)} | "
              f"{median['token_nll'] / median['flat reference']:.3f} | {median['token_nll'] / median['backbone']:.3f} | "
              f"{median['dcd7372 layout'] / median['flat reference']:.3f} | {difference:.1e} |", flush=True)
        del model
    print(f"\n{args.length} tokens, {args.rounds} rounds, torch {torch.__version__}, {args.threads} threads",
          file=sys.stderr)


if __name__ == "__main__":
    main()
