"""Train the tiny Llama testbeds: small RoPE models with a 256-token window.

    python tests/testbed/train.py --corpus ../shared/corpus --output tests/testbed/tiny-llama-256
    python tests/testbed/train.py --corpus ../shared/corpus --shape tiny-llama3-256 --threads 1 \
        --output tests/testbed/tiny-llama3-256
    python tests/testbed/train.py --corpus ../shared/corpus --shape tiny-llama-256 --needles \
        --init tests/testbed/tiny-llama-256 --needle-rows 12 --curriculum 0.5 --steps 1300 --lr 2e-3 \
        --threads 1 --output tests/testbed/tiny-llama-256-needles

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

tiny-llama-256-needles is tiny-llama-256 (its weights, shape and tokenizer files) fine-tuned to retrieve
inside its window, so that a needle-driven search objective has something to measure (tiny-llama-256
scores a needle's answer no better when the needles hold it than when they do not). Each batch is
16 - needle-rows windows of the training text and --needle-rows gold needle items (needles.build_item,
gold=True: the answer follows the prompt; no chat template), of every task whose gold items fit in 256
tokens with this tokenizer (needle_tasks_that_fit: niah_single, niah_multikey and passkey; niah_multivalue
needs 251-285 tokens, niah_multiquery 299-343, vt 461-490), on haystacks cut from the training books (the
passkey's: its noise filler), first needles at depths drawn in [0, 1]. The loss is the text rows' mean
plus the needle rows' mean on their answer tokens only: the rest of a needle row is training text, fixed
templates or random digits (ln 10 a digit, whatever the model does), none of which teaches retrieval.
--curriculum 0.5: the items grow from no haystack to their full length (up to 256) over the first half
of the steps. With 8 needle rows, no curriculum and 1000 steps at the same rate, the answer-token NLL
with the true needles against a control whose needle digits are changed was only 1.64 / 2.47 nats
(niah_single), 1.81 / 2.00 (niah_multikey), 1.46 / 2.49 (passkey); with this command 0.99 / 3.24,
1.71 / 2.30, 0.66 / 3.26, and perplexity at 256 on the held-out text 65.5 (tiny-llama-256: 69.1)
(benchmarks/needle_retrieval.py measures these, at 2048 with each factor set too).

Deterministic: fixed seeds and data order; the weights are bit-identical for the same torch
version and thread count (--threads, default 2). tiny-llama-256: about 10 minutes on 2 CPU cores;
tiny-llama3-256: 39 minutes on one thread of the shared machine (load 6-10), final loss 4.164;
tiny-llama-256-needles: 22 minutes on one thread of the shared machine (load 4-6), final loss 4.835
(text rows 3.931, answer tokens 0.904; one batch); a second run gave a bit-identical model.safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longrope_convert.needles import (NEEDLE_TASKS, SENTENCE_END, Haystack, NeedleTask, build_item,
                                      noise_haystack, required_tokens, tokenized_haystack)

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
NEEDLE_FIT_DRAWS = 200  # a task is trained on when this many of its gold items all fit in the window
HAYSTACK_CHARS = 4000  # text cut from a book for one needle item's haystack (about 1000 tokens)


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


def needle_tasks_that_fit(tokenizer) -> list[NeedleTask]:
    """The needle tasks whose gold items (prompt and expected answer, no haystack) fit in the window for each of
    NEEDLE_FIT_DRAWS draws with this tokenizer."""
    return [task for task in NEEDLE_TASKS.values()
            if max(required_tokens(tokenizer, task, random.Random(f"fit:{task.name}:{draw}"), gold=True)
                   for draw in range(NEEDLE_FIT_DRAWS)) <= WINDOW]


def haystack_cut(tokenizer, text: str, chars: int, rng: random.Random, name: str) -> Haystack:
    """A haystack of `chars` characters of `text` (longer than 2 x chars), from the first sentence start after an
    offset drawn by `rng`."""
    start = rng.randrange(len(text) - 2 * chars)
    chunk = text[start : start + 2 * chars]
    sentence_end = SENTENCE_END.search(chunk)
    return tokenized_haystack(tokenizer, chunk[sentence_end.end() if sentence_end else 0:][:chars], name)


def needle_row(tokenizer, tasks: list[NeedleTask], texts: list[str], noise: Haystack, reach: float,
               rng: random.Random) -> tuple[list[int], range]:
    """One gold needle item (needles.build_item, gold=True) of a task drawn from `tasks`, at a length drawn
    between the least that holds it (`needed`) and needed + reach x (WINDOW - needed), its first needle at a
    depth drawn in [0, 1]; the haystack cut from a training book (drawn by length; `texts` each longer than
    2 x HAYSTACK_CHARS), or `noise` (the noise filler) for the passkey. Returns its token ids and the
    positions of the expected answer."""
    needed = WINDOW + 1
    while needed > WINDOW:  # a draw longer than any seen by needle_tasks_that_fit is drawn again
        task = rng.choice(tasks)
        draw_seed = rng.getrandbits(64)
        needed = required_tokens(tokenizer, task, random.Random(draw_seed), gold=True)
    length, depth = rng.randint(needed, needed + round(reach * (WINDOW - needed))), rng.random()
    if task.haystack == "noise":
        haystack = noise
    else:
        haystack = haystack_cut(tokenizer, rng.choices(texts, weights=[len(t) for t in texts])[0], HAYSTACK_CHARS,
                                rng, "training text")
    item = build_item(tokenizer, task, haystack, length, depth, random.Random(draw_seed), gold=True)
    return item.input_ids, range(*item.answer_span)


def needle_batch(tokenizer, tasks: list[NeedleTask], texts: list[str], noise: Haystack, rows: int, reach: float,
                 rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` needle rows (needle_row) padded to WINDOW ([rows, WINDOW] ids) and their labels: the answer
    tokens, -100 elsewhere (the loss is taken on the answers only)."""
    ids = torch.full((rows, WINDOW), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((rows, WINDOW), -100, dtype=torch.long)
    for row in range(rows):
        item_ids, answer = needle_row(tokenizer, tasks, texts, noise, reach, rng)
        ids[row, : len(item_ids)] = torch.tensor(item_ids)
        labels[row, answer.start : answer.stop] = ids[row, answer.start : answer.stop]
    return ids, labels


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] on the labels [B, T] that are not -100."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny-llama-256")
    parser.add_argument("--init", type=Path, help="fine-tune this testbed (its weights and tokenizer files) "
                        "instead of training a tokenizer and a model from scratch")
    parser.add_argument("--needles", action="store_true", help="mix gold needle items into every batch")
    parser.add_argument("--needle-rows", type=int, default=8, help="needle rows of each batch (with --needles)")
    parser.add_argument("--curriculum", type=float, default=0.0,
                        help="needle items grow from no haystack to full length over this share of the steps")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    texts = training_texts(args.corpus)
    if args.init is None:
        tokenizer = train_tokenizer(texts)
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape]))
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.init)
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        if {key: model.config.to_dict()[key] for key in SHAPES[args.shape]} != SHAPES[args.shape]:
            parser.error(f"{args.init} is not a {args.shape}")
    stream = torch.tensor([token for text in texts for token in [0, *tokenizer(text).input_ids]], dtype=torch.long)
    print(f"{len(texts)} books, {stream.numel()} tokens", flush=True)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    if args.needles:
        tasks = needle_tasks_that_fit(tokenizer)
        haystack_texts = [text for text in texts if len(text) > 2 * HAYSTACK_CHARS]
        noise = noise_haystack(tokenizer, WINDOW)
        needle_rng = random.Random(0)
        print(f"needle tasks that fit in {WINDOW} tokens: {', '.join(task.name for task in tasks)}; "
              f"{args.needle_rows} of {args.batch} rows a batch", flush=True)
    text_rows = args.batch - (args.needle_rows if args.needles else 0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = args.steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - WINDOW - 1, (text_rows,), generator=generator)
        batch = torch.stack([stream[s : s + WINDOW] for s in starts.tolist()])
        if not args.needles:
            loss = model(batch, labels=batch).loss
            report = f"loss {loss.item():.3f}"
        else:  # the text rows' mean loss plus the needle rows' mean loss on their answer tokens
            reach = min(1.0, step / (args.curriculum * args.steps)) if args.curriculum else 1.0
            needle_ids, needle_labels = needle_batch(tokenizer, tasks, haystack_texts, noise, args.needle_rows, reach,
                                                     needle_rng)
            logits = model(torch.cat([batch, needle_ids])).logits  # [batch, WINDOW, vocab]
            text_loss = shifted_loss(logits[:text_rows], batch)
            answer_loss = shifted_loss(logits[text_rows:], needle_labels)
            loss = text_loss + answer_loss
            report = f"loss {loss.item():.3f} (text {text_loss.item():.3f}, answers {answer_loss.item():.3f})"
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} {report} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.save_pretrained(args.output)
    if args.init is None:
        tokenizer.save_pretrained(args.output)
    else:  # the same tokenizer files, byte for byte
        for name in TOKENIZER_FILES:
            shutil.copyfile(args.init / name, args.output / name)


if __name__ == "__main__":
    main()
