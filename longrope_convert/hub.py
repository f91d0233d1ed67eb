"""The Hugging Face Hub as fetch.py and publish.py both use it: repo ids, the endpoint and the cache, and
huggingface_hub's errors turned into one line that says what to do (HubError).

Light: huggingface_hub is imported by the functions that need it, so the --data reader can tell a dataset
id from a path (REPO_ID) without it.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import HubError

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


def offline_push_message(repo_id: str) -> str:
    """Why a push cannot start with HF_HUB_OFFLINE set (checked before anything, and met by push_folder)."""
    return f"HF_HUB_OFFLINE is set: pushing to '{repo_id}' needs {endpoint()}; unset HF_HUB_OFFLINE to push"


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, pushing: bool = False,
               repo_type: str = "model") -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one line that says what to do; `repo_type` "model" or "dataset"."""
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
            f"no {repo_type} repo '{repo_id}' on {endpoint()} (if it is private, log in with `hf auth login` or set "
            "HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"'{repo_id}' has no revision '{revision}' (give a branch, tag or commit)") from None
    except RemoteEntryNotFoundError as error:
        raise HubError(f"'{repo_id}': a file is missing on the Hub ({first_line(error)})") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError):
        if pushing and constants.HF_HUB_OFFLINE:
            raise HubError(offline_push_message(repo_id)) from None
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
