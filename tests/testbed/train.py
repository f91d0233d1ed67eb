"""Train the tiny Llama testbed: a 2.2M-parameter RoPE model with a 256-token window.

    python tests/testbed/train.py --corpus ../shared/corpus --output tests/testbed/tiny-llama-256

A fast, real model for the search: trained on the public-domain corpus (every book except the two
held out for tests: The Adventures of Tom Sawyer, used as search data, and The Adventures of
Sherlock Holmes, used as test data), with a byte-level BPE tokenizer of 2048 tokens learned from
the same books. At 8x its window (2048 tokens) unscaled RoPE fails, and the factor sets differ.

Deterministic: fixed seeds and data order; the weights are bit-identical for the same torch
version and thread count (--threads, default 2). About 10 minutes on 2 CPU cores.
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
MODEL = dict(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=3,
             num_key_value_heads=3, max_position_embeddings=WINDOW, rope_parameters={"rope_type": "default",
             "rope_theta": 10000.0}, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def training_texts(corpus: Path) -> list[str]:
    manifest = json.loads((corpus / "manifest.json").read_text())
    return [(corpus / entry["path"]).read_text() for entry in manifest if entry["name"] not in HELD_OUT]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MODEL["vocab_size"], special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
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

    model = LlamaForCausalLM(LlamaConfig(**MODEL))
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
