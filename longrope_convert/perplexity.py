"""Perplexity: documents, a LongRoPE model whose factors can be swapped, and chunked NLL.

One implementation for the search's fitness, the evaluation and the tests. The model's hidden
states are computed once; the LM head and the loss run over chunks of positions, so memory is
O(length x hidden), never O(length x vocab).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import DataError
from .factors import FactorSet


@dataclass
class Document:
    name: str
    text: str


TEXT_SUFFIXES = (".txt", ".jsonl")


def read_documents(sources: list[str]) -> Iterator[Document]:
    """Texts from files (.txt: one document; .jsonl: a "text" field per line), folders (their .txt and
    .jsonl files, sorted) or a `datasets` id ("pg19", "pg19:test", a local dataset folder "./books:train"),
    streamed when that library is installed.

    Lazy: files are opened and dataset rows fetched only as the documents are consumed, so a caller
    that stops early (tokenized_documents with a limit) reads no further. Files must be UTF-8 (a BOM is
    allowed). Raises DataError naming the source, or the file and line, that cannot be read.
    """
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not files:
                raise DataError(f"data folder '{path}' has no .txt or .jsonl files (for a `datasets` folder, name "
                                f"its split: '{path}:train')")
            for file in files:
                yield from _read_file(file)
        elif path.is_file():
            yield from _read_file(path)
        else:
            yield from _read_dataset(source)


def _read_file(path: Path) -> Iterator[Document]:
    if path.suffix != ".jsonl":
        yield Document(str(path), _decode(path.read_bytes(), path, 1))
        return
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}:{number}: not a JSON object with a 'text' field") from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: 'text' is a {type(text).__name__}, not a string")
            yield Document(f"{path}:{number}", text)


def _decode(data: bytes, path: Path, first_line: int) -> str:
    """UTF-8 text (a leading BOM dropped), or a DataError naming the file and line: decoding with
    replacement would score replacement characters instead of the text."""
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x}); re-encode the file, e.g. with "
                        "`iconv -f latin1 -t utf-8` for a Latin-1 file") from None


def _read_dataset(name: str) -> Iterator[Document]:
    from .hub import REPO_ID  # a Hub id ("pg19", "org/name"); else a path that does not exist

    dataset_id, _, split = name.partition(":")
    looks_like_id = REPO_ID.fullmatch(dataset_id) and Path(dataset_id).suffix not in TEXT_SUFFIXES
    if not looks_like_id and not Path(dataset_id).is_dir():
        raise DataError(f"data '{name}': no such file or folder")
    try:
        import datasets
    except ImportError:
        raise DataError(f"data '{name}' is not a file or folder (and the `datasets` library, needed for dataset "
                        "ids, is not installed)") from None
    try:  # the library raises many kinds; all mean "cannot use this id here"
        for number, row in enumerate(datasets.load_dataset(dataset_id, split=split or "test", streaming=True)):
            if not isinstance(row.get("text"), str):
                raise DataError(f"data '{name}': row {number} has no 'text' string")
            yield Document(f"{dataset_id}:{number}", row["text"])
    except DataError:
        raise
    except Exception as error:
        message = next((line for line in str(error).splitlines() if line.strip()), "")
        raise DataError(f"data '{name}': cannot read the dataset ({type(error).__name__}: {message})") from None


def tokenized_documents(tokenizer, documents: Iterable[Document], length: int,
                        limit: int | None = None) -> tuple[list[torch.Tensor], list[str], int]:
    """Up to `limit` documents of at least `length` tokens, each as BOS + its first length - 1 tokens.

    Returns (token id tensors [1, length], their names, how many documents were skipped: shorter ones,
    and empty or whitespace-only ones, which are no documents at all). Iteration stops at the
    `limit`-th document kept, so a streamed dataset is read no further than needed.
    """
    kept, names, skipped = [], [], 0
    if limit == 0:
        return kept, names, skipped  # without pulling a document from the stream
    for document in documents:
        ids = document_ids(tokenizer, document.text, length) if document.text.strip() else None
        if ids is None or ids.shape[1] < length:
            skipped += 1
            continue
        kept.append(ids)
        names.append(document.name)
        if len(kept) == limit:
            break
    return kept, names, skipped


def load_longrope_model(folder: str | Path, config: dict, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None):
    """The shipped LongRoPE model on the weights in `folder`, configured by the config dict given
    (weights in `dtype`, default bf16 on CUDA and fp32 elsewhere; the rotary math is float32 in every
    dtype; SDPA attention; eval mode)."""
    from transformers import LlamaConfig

    from .modeling_longrope_llama import LongRoPELlamaForCausalLM

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LongRoPELlamaForCausalLM.from_pretrained(
        folder, config=LlamaConfig.from_dict(config), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def use_factor_set(model, factor_set: FactorSet) -> None:
    """Swap a factor set into the model's rotary embedding in place. A set whose short set is the source's own
    RoPE (short_set "source") gets it back exactly, after sets with short factors replaced it; the model must
    have been loaded for that source (its config's longrope.source_rope), else ValueError."""
    rotary = model.model.rotary_emb
    source_short_set = factor_set.short_set == "source"
    rotary.set_factors(
        long_factor=factor_set.long_factor, short_factor=None if source_short_set else factor_set.short_factor,
        n_hat=factor_set.n_hat, long_mscale=factor_set.long_mscale, short_mscale=factor_set.short_mscale)
    if source_short_set:
        source_rope = factor_set.model.base_factor_set().source_rope
        if rotary.source_rope != source_rope:
            raise ValueError(f"the model was loaded for a source with RoPE {rotary.source_rope}, the factor set is "
                             f"for one with {source_rope}")
        if rotary.short_set != "source":
            rotary.short_set = "source"
            rotary.reset_buffers()


def document_ids(tokenizer, text: str, length: int | None = None) -> torch.Tensor:
    """[1, n] token ids: BOS, then the text's first tokens (all of them, or length - 1)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if length is not None:
        ids = ids[:length]
    return torch.tensor([ids], dtype=torch.long)


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """Negative log-likelihood of tokens 1 .. n-1 of each row, [batch, n-1] float32.

    `model` is a causal LM with `.model` (the backbone) and `.lm_head`, as Llama has. The logits
    exist for `chunk_size` positions at a time (with their log-softmax, 2 x chunk x vocab floats),
    so memory beyond the backbone's activations does not grow with the length.
    """
    input_ids = input_ids.to(model.device)
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = input_ids[:, 1:]
    nll = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[1], chunk_size):
        end = min(start + chunk_size, targets.shape[1])
        logits = model.lm_head(hidden[:, start:end]).float()
        nll[:, start:end] = F.cross_entropy(logits.transpose(1, 2), targets[:, start:end], reduction="none")
    return nll


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL) over all the tokens given; inf when that overflows a double (mean NLL above
    ~709.78 nats), nan when an NLL is nan."""
    return torch.exp(nll.double().mean()).item()
