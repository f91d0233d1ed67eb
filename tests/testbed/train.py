"""Train the tiny Llama testbeds: small RoPE models with a 256-token window.

    python tests/testbed/train.py --corpus ../shared/corpus --output tests/testbed/tiny-llama-256
    python tests/testbed/train.py --corpus ../shared/corpus --shape tiny-llama3-256 --threads 1 \
        --output tests/testbed/tiny-llama3-256

Fast, real models for the search: trained on the public-domain corpus (every book except the two
held out for tests: The Adventures of Tom Sawyer, used as search data, and The Adventures of
Sherlock Holmes, used as test data), with a byte-level BPE tokenizer of 2048 tokens learned from
the same books (the same tokenizer for every shape). At 8x their window (2048 tokens) unscaled RoPE
fails, and the factor sets differ. Shapes (SHAPES):

  tiny-llama-256    2.2M parameters: head_dim 64 (32 factors), 3 query and 3 KV heads, rope_theta 10000
  tiny-llama3-256   Llama-3-shaped: head_dim 128 (64 factors), 2 query heads sharing 1 KV head (grouped
                    KV), hidden 256 = heads x head_dim, rope_theta 900. The theta puts LongRoPE2's critical
                    dimension ceil(d/2 log_theta(L / 2 pi)) - 1 (arXiv 2502.20082) at 34 of 64 for L = 256
                    (34.88 before the ceiling), where Llama-3-8B's is (theta 500000, L = 8192: 34.98); the
                    dimensions beyond it never turn a full period inside the window. Thetas in [880, 1073]
                    give 34.

Deterministic: fixed seeds and data order; the weights are bit-identical for the same torch
version and thread count (--threads, default 2). tiny-llama-256: about 10 minutes on 2 CPU cores;
tiny-llama3-256: 39 minutes on one thread of the shared machine (load 6-10), final loss 4.164.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HELD_OUT = ("twain_tomsawyer", "doyle_sherlock_adventures")
WINDOW = 256
VOCAB_SIZE = 2048
COMMON = dict(vocab_size=VOCAB_SIZE, num_hidden_layers=4, max_position_embeddings=WINDOW, tie_word_embeddings=True,
              bos_token_id=0, eos_token_id=1, pad_token_id=1)
SHAPES = {
    "tiny-llama-256": dict(COMMON, hidden_size=192, intermediate_size=512, num_attention_heads=3,
                           num_key_value_heads=3, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "tiny-llama3-256": dict(COMMON, hidden_size=256, head_dim=128, intermediate_size=384, num_attention_heads=2,
                            num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 900.0}),
}


def training_texts(corpus: Path) -> list[str]:
    manifest = json.loads((corpus / "manifest.json").read_text())
    return [(corpus / entry["path"]).read_text() for entry in manifest if entry["name"] not in HELD_OUT]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny-llama-256")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    texts = training_texts(args.corpus)
    tokenizer = train_tokenizer(texts)
    stream = torch.tensor([token for text in texts for token in [0, *tokenizer(text).input_ids]], dtype=torch.long)
    print(f"{len(texts)} books, {stream.numel()} tokens", flush=True)

    model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape]))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = args.steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - WINDOW - 1, (args.batch,), generator=generator)
        batch = torch.stack([stream[s : s + WINDOW] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)


if __name__ == "__main__":
    main()
