"""The Hugging Face Hub, through huggingface_hub: fetch a source checkpoint (publishing is publish.py).

Downloads take only what a conversion needs (never pickle weights or Meta's original/ folder), go
through huggingface_hub's cache and progress bars, and honour HF_HUB_OFFLINE. Every Hub failure
becomes a one-line HubError that says what to do.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint_files import PICKLE_PATTERNS, SOURCE_FILES, pickle_files
from .errors import HubError, LongRoPEError

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
        raise HubError(f"'{repo_id}': a file is missing on the Hub ({first_line(error)})") from None
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
        raise HubError(f"the Hub refused the request for '{repo_id}': {first_line(error)}") from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise HubError(f"disk full while downloading '{repo_id}' to {constants.HF_HUB_CACHE}: free space "
                                "or point HF_HOME to a larger disk") from None
        raise


def first_line(error: Exception) -> str:
    """The first non-empty line of an error's message (else its type's name)."""
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
