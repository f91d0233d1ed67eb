"""The Hugging Face Hub, through huggingface_hub: fetch a source checkpoint, push a converted one.

Downloads take only what a conversion needs (never pickle weights or Meta's original/ folder), go
through huggingface_hub's cache and progress bars, and honour HF_HUB_OFFLINE. A push is one commit
that mirrors the folder (conversion outputs the folder lacks are deleted in it, the user's other
files kept), so a failed push leaves the repo as it was, and pushing an unchanged folder again makes
no commit; the card's metadata is checked by the Hub before anything is created. The token comes
from HF_TOKEN or the saved login; it is never printed. Every Hub failure becomes a one-line
HubError that says what to do.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .card import LOADING_REQUIREMENT, updated_card
from .checkpoint_files import (
    CARD_FILE,
    FACTORS_FILE,
    PICKLE_PATTERNS,
    SOURCE_FILES,
    is_conversion_output,
    pickle_files,
)
from .errors import HubError, LongRoPEError
from .outputs import write_text_atomically

ALLOW_PATTERNS = list(SOURCE_FILES)  # what a conversion reads
# Nothing in subfolders (Meta's original/ among them) and no pickle files, whatever the allow list says.
IGNORE_PATTERNS = ["*/*", *PICKLE_PATTERNS]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*")


def looks_like_repo_id(source: str) -> bool:
    return not Path(source).exists() and REPO_ID.fullmatch(source) is not None and ".." not in source


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, pushing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one line that says what to do."""
    try:  # huggingface_hub 2.x speaks HTTP through httpx2, 1.x through httpx
        import httpx2 as httpx
    except ImportError:
        import httpx
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise HubError(
            f"'{repo_id}' is a gated repo and this account has no access: accept its licence at "
            f"{endpoint()}/{repo_id}, then log in with `hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"no model repo '{repo_id}' on {endpoint()} (if it is private, log in with `hf auth login` or set "
            "HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"'{repo_id}' has no revision '{revision}' (give a branch, tag or commit)") from None
    except RemoteEntryNotFoundError as error:
        raise HubError(f"'{repo_id}': a file is missing on the Hub ({_first_line(error)})") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError):
        if pushing:
            raise HubError(f"the connection to {endpoint()} failed while pushing to '{repo_id}'; nothing was "
                                "committed: run the command again") from None
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"HF_HUB_OFFLINE is set and '{repo_id}' is not in the local cache; unset it to "
                                "download") from None
        raise HubError(f"cannot reach {endpoint()} to get '{repo_id}' (no network?); with a cached copy, set "
                            "HF_HUB_OFFLINE=1 to use it") from None
    except HfHubHTTPError as error:
        raise HubError(f"the Hub refused the request for '{repo_id}': {_first_line(error)}") from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise HubError(f"disk full while downloading '{repo_id}' to {constants.HF_HUB_CACHE}: free space "
                                "or point HF_HOME to a larger disk") from None
        raise


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _refuse_pickle_only(repo_id: str, revision: str | None) -> None:
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return
    files = [sibling.rfilename for sibling in HfApi().model_info(repo_id, revision=revision).siblings or []]
    top_level = [name for name in files if "/" not in name]
    if not any(name.endswith(".safetensors") for name in top_level):
        pickles = pickle_files(top_level)
        what = f"only pickle weights ({', '.join(pickles[:3])})" if pickles else "no *.safetensors weights"
        raise LongRoPEError(f"'{repo_id}' has {what}; longrope-convert never loads pickle files: use a repo "
                            "that ships safetensors, or convert a local copy first")


def download_source(repo_id: str, revision: str | None = None, files: list[str] | None = None) -> Path:
    """The snapshot folder of `files` (names or patterns; default ALLOW_PATTERNS, what a conversion may
    need), from the cache or downloaded into it."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision):
        if files is None:
            _refuse_pickle_only(repo_id, revision)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files or ALLOW_PATTERNS,
                                      ignore_patterns=IGNORE_PATTERNS))


class HubFiles:
    """A Hub repo's top-level files at one revision (those ALLOW_PATTERNS admits), read over HTTP without
    caching: what a dry run plans with, and what a real run checks before it downloads anything. A
    source.SourceFiles."""

    def __init__(self, repo_id: str, revision: str | None = None) -> None:
        from huggingface_hub import snapshot_download

        self.repo_id, self.revision = repo_id, revision
        with hub_errors(repo_id, revision):
            _refuse_pickle_only(repo_id, revision)
            listing = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                        ignore_patterns=IGNORE_PATTERNS, dry_run=True)
        self.commit = listing[0].commit_hash if listing else revision  # every read sees the same commit
        self.sizes = {item.filename: item.file_size or 0 for item in listing}
        self.not_cached = {item.filename for item in listing if not item.is_cached}

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers()
        if start or length is not None:
            headers["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
        with hub_errors(self.repo_id, self.revision):
            response = get_session().get(hf_hub_url(self.repo_id, name, revision=self.commit), headers=headers)
            hf_raise_for_status(response)
        data = response.content if response.status_code == 206 else response.content[start:]  # 200: range ignored
        return data if length is None else data[:length]


HUB_FILES = (".gitattributes",)  # written by the Hub itself when it creates a repo


@dataclass
class PushResult:
    repo_url: str
    commit: str
    changed: bool  # False when the folder was already there, unchanged: no commit was made
    deleted: list[str]  # files of an earlier conversion, deleted in the same commit
    kept: list[str]  # files in the repo that are not conversion outputs, left as they were


def push_folder(folder: Path, repo_id: str, *, private: bool = False, branch: str | None = None,
                commit_message: str | None = None, log: Callable[[str], None] = lambda message: None) -> PushResult:
    """Publish a converted checkpoint folder as one commit on `branch` (default main) of `repo_id`,
    creating the repo and the branch when needed.

    The card's loading snippet is first set to repo_id and branch (README.md rewritten in the folder),
    and the card's metadata is checked by the Hub (validate-yaml) before anything is created. The
    commit mirrors the folder: conversion outputs in the repo that the folder lacks are deleted in it;
    other files stay. A repo or branch created by this call is deleted again if the push fails.
    Raises LongRoPEError for a folder that is not a converted checkpoint, HubError for a refusal.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    _check_converted(folder)
    card = updated_card(folder, repo=repo_id, revision=branch)
    api = HfApi()
    with hub_errors(repo_id, branch, pushing=True):
        _validate_card(card, folder)
        if _base_model(card) == repo_id:  # would overwrite the source's config.json and card
            raise HubError(f"'{repo_id}' is the base model {folder} was converted from (its card's base_model); "
                           "push the converted checkpoint to a repo of its own")
        if not (folder / CARD_FILE).is_file() or card != (folder / CARD_FILE).read_text(encoding="utf-8"):
            write_text_atomically(folder / CARD_FILE, card)
        local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")  # no hidden files
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        created_repo, created_branch = not api.repo_exists(repo_id), False
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if branch and not api.revision_exists(repo_id, branch):
                api.create_branch(repo_id, branch=branch)
                created_branch = True
            before = api.repo_info(repo_id, revision=branch).sha
            remote = set(api.list_repo_files(repo_id, revision=before)) - set(local) - set(HUB_FILES)
            deleted = sorted(path for path in remote if is_conversion_output(path))
            operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=folder / path) for path in local]
            operations += [CommitOperationDelete(path_in_repo=path) for path in deleted]
            info = api.create_commit(repo_id, operations=operations, revision=branch, parent_commit=before,
                                     commit_message=commit_message or f"Upload {folder.name} (longrope-convert)")
        except BaseException:
            _undo(api, repo_id, branch, created_repo, created_branch, log)
            raise
    return PushResult(repo_url=str(url), commit=info.oid, changed=info.oid != before, deleted=deleted,
                      kept=sorted(remote - set(deleted)))


def _check_converted(folder: Path) -> None:
    config = folder / "config.json"
    rope = (json.loads(config.read_text()).get("rope_scaling") or {}) if config.is_file() else {}
    if rope.get("rope_type") != "longrope" or not (folder / FACTORS_FILE).is_file():
        raise LongRoPEError(f"'{folder}' is not a checkpoint written by longrope-convert (no longrope rope_scaling "
                            f"in config.json, or no {FACTORS_FILE})")


def _validate_card(card: str, folder: Path) -> None:
    """The Hub's own check of the card metadata (what a commit of README.md would be refused for)."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        ModelCard(card, ignore_metadata_errors=True).validate()
    except yaml.YAMLError as error:  # the front matter cannot be read at all
        raise HubError(f"{folder / CARD_FILE}: its front matter is not valid YAML ({_first_line(error)}); fix it "
                       "and push again (nothing was created)") from None
    except ValueError as error:  # the Hub's answer, a JSON list of errors as text
        try:
            reasons = "; ".join(item["message"].rstrip(".") for item in json.loads(str(error))["errors"])
        except (ValueError, KeyError, TypeError):
            reasons = _first_line(error)
        raise HubError(f"the Hub refuses the metadata of {folder / CARD_FILE}: {reasons}; fix its front matter "
                       "and push again (nothing was created)") from None


def _base_model(card: str) -> str | None:
    """The card's `base_model` (the first, when it lists several)."""
    from huggingface_hub import ModelCard

    base = ModelCard(card, ignore_metadata_errors=True).data.base_model
    return base[0] if isinstance(base, list) and base else base


def _undo(api, repo_id: str, branch: str | None, created_repo: bool, created_branch: bool,
          log: Callable[[str], None]) -> None:
    """Delete what a failed push created, so it leaves no empty repo or branch behind."""
    try:
        if created_repo:
            api.delete_repo(repo_id, missing_ok=True)
        elif created_branch:
            api.delete_branch(repo_id, branch=branch)
    except Exception as error:  # the push's own error matters more; say what is left over
        what = f"repo '{repo_id}'" if created_repo else f"branch '{branch}' of '{repo_id}'"
        log(f"WARNING: the {what} created for this push could not be deleted ({_first_line(error)}); delete it "
            "on the Hub")


def loading_snippet(repo_id: str, commit: str) -> str:
    """Python that loads the pushed commit with the shipped modeling code, and the transformers it needs."""
    return (f"# needs {LOADING_REQUIREMENT} (pip install -U '{LOADING_REQUIREMENT}')\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True, revision="{commit}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", revision="{commit}")')
