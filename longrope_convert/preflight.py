"""Checks of what `search`, `eval` and `--push-to` need, made before the expensive part (loading a
model, a search of hours, writing a checkpoint): each failure is one line naming the file or option.

They read only names, JSON files and permissions; nothing here imports torch or writes anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .checkpoint_files import has_tokenizer
from .errors import HubError, LongRoPEError, OutputError, SourceError
from .outputs import check_output_folder, check_outside, check_writable_place

JSON_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_tokenizer(folder: Path) -> None:
    """The checkpoint has tokenizer files, and those in JSON parse. Raises SourceError."""
    folder = Path(folder)
    if not has_tokenizer(path.name for path in folder.iterdir() if path.is_file()):
        raise SourceError(f"'{folder}' has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with "
                          "merges.txt): copy the tokenizer files of the model it was made from into it")
    for name in JSON_TOKENIZER_FILES:
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_bytes())
            except ValueError as error:
                raise SourceError(f"{folder / name}: not a readable JSON file ({error})") from None


def check_data(data: Sequence[str]) -> None:
    """Each --data entry is a readable text/JSONL file, a folder holding some, or (when the `datasets`
    library is installed) a dataset id: documents.data_source_kind, the reader's own rule. Raises
    DataError naming the entry."""
    from .documents import data_source_kind

    for entry in data:
        data_source_kind(entry)


def check_writable_file(path: Path, setting: str) -> None:
    """A file can be written at `path` (given as `setting`): not a folder, in a writable place.
    Raises OutputError."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{{{setting}}} '{path}' is a folder; give a file name", setting=setting, value=str(path),
                          file=path)
    check_writable_place(path)


def check_search_inputs(source, data: Sequence[str], log_path: Path | None, resume: bool) -> None:
    """What a search needs before its model is loaded: the tokenizer, the data, a log it may write (outside
    the source and the Hugging Face cache)."""
    from .convert import source_guards

    check_tokenizer(source.folder)
    check_data(data)
    if log_path is not None:
        check_outside(log_path, source_guards(source)[1], "resume" if resume else "log")
        if not resume:
            check_writable_file(log_path, "log")


def check_search_outputs(source, out: Path, convert_to: Path | None) -> None:
    """Where a search writes its results, checked before it starts: the factor file, and the converted
    checkpoint of --convert-to (a new folder, checked as convert checks its --output)."""
    from .convert import check_conversion_output, source_guards

    check_outside(out, source_guards(source)[1], "out")
    check_writable_file(out, "out")
    if convert_to is not None:
        if Path(convert_to).exists():
            raise OutputError(f"{{convert_to}} '{convert_to}' already exists; give a new folder", setting="convert_to",
                              value=str(convert_to), file=convert_to)
        check_conversion_output(source, convert_to, overwrite=False, setting="convert_to")


def check_evaluation_inputs(checkpoint: Path, data: Sequence[str], out: Path | None) -> None:
    """What an evaluation needs before its model is loaded: the tokenizer, the data, and a results
    folder (default CHECKPOINT/eval) that may be replaced and holds none of the checkpoint's files."""
    from .card import EVAL_DIR

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise SourceError(f"checkpoint '{checkpoint}' is not a folder")
    check_tokenizer(checkpoint)
    check_data(data)
    protected = {checkpoint: "the checkpoint"}
    protected.update((path, "a file of the checkpoint") for path in checkpoint.iterdir() if path.is_file())
    check_output_folder(out if out is not None else checkpoint / EVAL_DIR, overwrite=True, protected=protected,
                        setting="out")


def check_push(repo_id: str) -> None:
    """A push to `repo_id` can work: not offline (HF_HUB_OFFLINE), the id is valid and a token is there that
    the Hub accepts. Raises LongRoPEError (HubError offline)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .hub import endpoint, hub_errors, hub_offline, offline_push_message

    if hub_offline():
        raise HubError(offline_push_message(repo_id))
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise LongRoPEError(f"{{push_to}} '{repo_id}' is not a valid repo id ({error})", setting="push_to",
                            value=repo_id) from None
    if get_token() is None:
        raise LongRoPEError(f"pushing to {endpoint()} needs a login: run `hf auth login` or set HF_TOKEN")
    with hub_errors(repo_id, pushing=True):
        HfApi().whoami()
