"""Fetch a source checkpoint: a local folder, or a Hugging Face Hub repo read remotely, then downloaded.

A Hub source is checked over HTTP first (config, safetensors headers: HubFiles), so that bad input fails
before anything is downloaded; then only what a conversion reads is downloaded (checkpoint_files.SOURCE_FILES,
never pickle weights or Meta's original/ folder), through huggingface_hub's cache and progress bars.
HF_HUB_OFFLINE reads the cache alone.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint_files import PICKLE_PATTERNS, SOURCE_FILES, WEIGHT_PATTERNS, pickle_files
from .errors import LongRoPEError
from .hub import hub_errors, hub_offline, looks_like_repo_id
from .source import SourceModel, describe_source, read_source

# Nothing in subfolders (Meta's original/ among them) and no pickle files, whatever the allow list says.
IGNORE_PATTERNS = ["*/*", *PICKLE_PATTERNS]


def open_source(source: str, revision: str | None = None, download: bool = True) -> SourceModel:
    """A local folder, or a Hub repo id. A Hub source's config and safetensors headers are read and
    checked remotely first; then, with `download`, what conversion needs (only the weight files the
    checks found) is downloaded into the Hub cache. Without `download` nothing is written. Offline
    (HF_HUB_OFFLINE), the cache alone is read."""
    if not looks_like_repo_id(source):
        if revision is not None:
            raise LongRoPEError(f"{{revision}} applies to Hub repo ids; '{source}' is a local path", setting="revision",
                                value=revision, file=source)
        return read_source(source)
    if hub_offline():
        return read_source(download_source(source, revision), name=source)
    remote = describe_source(HubFiles(source, revision), source, Path(source))
    if not download:
        return remote
    wanted = [p for p in SOURCE_FILES if p not in WEIGHT_PATTERNS] + [path.name for path in remote.weight_files]
    return read_source(download_source(source, revision, files=wanted), name=source)


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
    """The snapshot folder of `files` (names or patterns; default SOURCE_FILES, what a conversion may
    read), from the cache or downloaded into it."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision):
        if files is None:
            _refuse_pickle_only(repo_id, revision)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files or list(SOURCE_FILES),
                                      ignore_patterns=IGNORE_PATTERNS))


def download_matching(repo_id: str, revision: str | None, pattern: str) -> Path:
    """The snapshot folder holding the repo's files whose paths match `pattern` (in any folder: convert --gguf's
    GGUF files), from the cache or downloaded into it."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[pattern]))


class HubFiles:
    """A Hub repo's top-level files at one revision (those SOURCE_FILES admits), read over HTTP without
    caching: what a dry run plans with, and what a real run checks before it downloads anything. A
    source.SourceFiles."""

    def __init__(self, repo_id: str, revision: str | None = None) -> None:
        from huggingface_hub import snapshot_download

        self.repo_id, self.revision = repo_id, revision
        with hub_errors(repo_id, revision):
            _refuse_pickle_only(repo_id, revision)
            listing = snapshot_download(repo_id, revision=revision, allow_patterns=list(SOURCE_FILES),
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
