"""Documents for perplexity: text files, JSONL files, folders of them, and `datasets` ids.

Torch-free, so that search and eval can check their --data before loading a model (preflight), with
the same rule the reader uses (data_source_kind).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, HubError
from .hub import REPO_ID  # a Hub id ("pg19", "org/name"); else a path that does not exist


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
        kind = data_source_kind(source)
        if kind == "folder":
            for file in _text_files(Path(source)):
                yield from _read_file(file)
        elif kind == "file":
            yield from _read_file(Path(source))
        else:
            yield from _read_dataset(source)


def data_source_kind(source: str) -> str:
    """"file", "folder" or "dataset" for a --data entry, checked without reading any document (what
    search and eval do before loading the model). Raises DataError naming the entry: a folder without
    .txt/.jsonl files, an unreadable file, a path that does not exist, a dataset id without the
    `datasets` library."""
    path = Path(source)
    if path.is_dir():
        if not _text_files(path):
            raise DataError(f"data folder '{path}' has no .txt or .jsonl files (for a `datasets` folder, name "
                            f"its split: '{path}:train')")
        return "folder"
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise DataError(f"data '{source}': permission denied")
        return "file"
    dataset_id = source.partition(":")[0]
    looks_like_id = REPO_ID.fullmatch(dataset_id) and Path(dataset_id).suffix not in TEXT_SUFFIXES
    if not looks_like_id and not Path(dataset_id).is_dir():
        raise DataError(f"data '{source}': no such file or folder")
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"data '{source}' is not a file or folder (and the `datasets` library, needed for dataset "
                        "ids, is not installed)")
    return "dataset"


def data_provenance(sources: list[str]) -> list[dict[str, Any]]:
    """--data as a factor file records it, without a path of this machine: a file as its name and the SHA-256 of
    its bytes; a folder as its name, its number of text files and a SHA-256 over their paths inside it and their
    bytes; a dataset as its id (a local dataset folder by its name), with the split when given."""
    from .search_log import file_sha256  # imports torch: only a search records its data

    records: list[dict[str, Any]] = []
    for source in sources:
        kind, path = data_source_kind(source), Path(source)
        if kind == "file":
            records.append({"name": path.name, "sha256": file_sha256(path)})
        elif kind == "folder":
            files = _text_files(path)
            digest = hashlib.sha256()
            for file in files:
                digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
            records.append({"name": path.resolve().name, "files": len(files), "sha256": digest.hexdigest()})
        else:
            dataset_id, colon, split = source.partition(":")
            local = Path(dataset_id).is_dir()  # what `datasets` loads for this id too
            records.append({"dataset": (Path(dataset_id).resolve().name if local else dataset_id) + colon + split})
    return records


def portable_document_name(name: str, sources: list[str]) -> str:
    """A document's name (Document.name) with the path of its --data file or folder replaced by that entry's
    name, as data_provenance records it: 'books/austen.txt' for '../corpus/books/austen.txt'."""
    for source in sources:
        path, dataset_folder = Path(source), Path(source.partition(":")[0])
        if path.is_file() and (name == str(path) or name.startswith((f"{path}:", f"{path}#"))):
            return path.name + name[len(str(path)):]
        if path.is_dir() and name.startswith(f"{path}{os.sep}"):
            return f"{path.resolve().name}/{Path(name[len(str(path)) + 1:]).as_posix()}"
        if not path.exists() and dataset_folder.is_dir() and name.startswith(f"{dataset_folder}:"):
            return dataset_folder.resolve().name + name[len(str(dataset_folder)):]
    return name


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())


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
    import datasets  # data_source_kind checked that it is installed

    dataset_id, _, split = name.partition(":")
    if not Path(dataset_id).is_dir() and not datasets.config.HF_HUB_OFFLINE:
        _check_hub_dataset(name, dataset_id)

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


def _check_hub_dataset(name: str, dataset_id: str) -> None:
    """One request for the dataset's info, answered within huggingface_hub's metadata timeout
    (HF_HUB_ETAG_TIMEOUT, 10 s by default), before `datasets` streams it: a Hub that cannot be reached,
    or a dataset that is not there, fails in one line instead of after `datasets`' retries (~25-35 s
    of them). Raises DataError."""
    from huggingface_hub import HfApi, constants

    from .hub import hub_errors

    try:
        with hub_errors(dataset_id, repo_type="dataset"):
            HfApi().dataset_info(dataset_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HubError as error:
        raise DataError(f"data '{name}': {error}") from None
