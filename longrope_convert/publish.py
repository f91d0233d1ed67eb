"""Publish a converted checkpoint on the Hugging Face Hub, through huggingface_hub.

A push is one commit that mirrors the folder (conversion outputs the folder lacks are deleted in it, the
user's other files kept), so a failed push leaves the repo as it was, and pushing an unchanged folder again
makes no commit; the card's metadata is checked by the Hub before anything is created. The token comes from
HF_TOKEN or the saved login; it is never printed. Every Hub failure becomes a one-line HubError that says
what to do (hub.hub_errors).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .card import LOADING_REQUIREMENT, loading_code, updated_card
from .checkpoint_files import CARD_FILE, FACTORS_FILE, has_tokenizer, is_conversion_output
from .errors import HubError, LongRoPEError
from .hub import first_line, hub_errors
from .outputs import write_text_atomically

HUB_FILES = (".gitattributes",)  # written by the Hub itself when it creates a repo


@dataclass
class PushResult:
    repo: str  # the repo id pushed to
    repo_url: str
    commit: str
    changed: bool  # False when the folder was already there, unchanged: no commit was made
    deleted: list[str]  # files of an earlier conversion, deleted in the same commit
    kept: list[str]  # files in the repo that are not conversion outputs, left as they were

    def summary(self) -> dict[str, Any]:
        return {"repo": self.repo, "url": self.repo_url, "commit": self.commit, "changed": self.changed,
                "deleted": self.deleted, "kept": self.kept}


def push_folder(folder: Path, repo_id: str, *, private: bool = False, branch: str | None = None,
                commit_message: str | None = None, status: Callable[[str], None] = lambda message: None) -> PushResult:
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
    check_converted(folder)
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
            _undo(api, repo_id, branch, created_repo, created_branch, status)
            raise
    return PushResult(repo=repo_id, repo_url=str(url), commit=info.oid, changed=info.oid != before, deleted=deleted,
                      kept=sorted(remote - set(deleted)))


def check_converted(folder: Path) -> None:
    """Raise LongRoPEError unless `folder` is a checkpoint this tool wrote (a longrope config and its factor file)."""
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
        raise HubError(f"{folder / CARD_FILE}: its front matter is not valid YAML ({first_line(error)}); fix it "
                       "and push again (nothing was created)") from None
    except ValueError as error:  # the Hub's answer, a JSON list of errors as text
        try:
            reasons = "; ".join(item["message"].rstrip(".") for item in json.loads(str(error))["errors"])
        except (ValueError, KeyError, TypeError):
            reasons = first_line(error)
        raise HubError(f"the Hub refuses the metadata of {folder / CARD_FILE}: {reasons}; fix its front matter "
                       "and push again (nothing was created)") from None


def _base_model(card: str) -> str | None:
    """The card's `base_model` (the first, when it lists several)."""
    from huggingface_hub import ModelCard

    base = ModelCard(card, ignore_metadata_errors=True).data.base_model
    return base[0] if isinstance(base, list) and base else base


def _undo(api, repo_id: str, branch: str | None, created_repo: bool, created_branch: bool,
          status: Callable[[str], None]) -> None:
    """Delete what a failed push created, so it leaves no empty repo or branch behind."""
    try:
        if created_repo:
            api.delete_repo(repo_id, missing_ok=True)
        elif created_branch:
            api.delete_branch(repo_id, branch=branch)
    except Exception as error:  # the push's own error matters more; say what is left over
        what = f"repo '{repo_id}'" if created_repo else f"branch '{branch}' of '{repo_id}'"
        status(f"WARNING: the {what} created for this push could not be deleted ({first_line(error)}); delete it "
            "on the Hub")


def loading_snippet(repo_id: str, commit: str, folder: Path) -> str:
    """Python that loads the commit pushed from `folder` with the shipped modeling code (and its tokenizer, when
    the folder has one), and the transformers it needs."""
    tokenizer = has_tokenizer(path.name for path in Path(folder).iterdir() if path.is_file())
    return (f"# needs {LOADING_REQUIREMENT} (pip install -U '{LOADING_REQUIREMENT}')\n"
            + loading_code(repo_id, commit, tokenizer).rstrip("\n"))
