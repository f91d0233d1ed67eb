"""Where results go: checks on an output location, and folders and files written atomically.

Every writer goes through here: a conversion's folder (atomic_folder), a GGUF file (atomic_file), factor
files, model cards and eval/ folders. A result appears complete or not at all. It is assembled in a
hidden staging folder (or file) next to its destination, `.<name>.partial-<pid>-<random>`, and renamed
into place at the end; a folder it replaces is first moved aside to `.<name>.old-<pid>-<random>`. The process id tells a later run what a
killed one left behind: that run deletes it and, if the kill came between the two renames, puts the
old output back. Folders written here carry a MARKER file, so that --overwrite replaces only a folder
this tool wrote (or an empty one), never the user's own, and never a source.

The guarantees hold for interrupted processes (errors, Ctrl-C, SIGTERM, SIGKILL), not for power loss:
nothing is fsync'd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import __version__
from .errors import OutputError

MARKER = ".longrope-convert"
# Staging names keep this much of the destination's name, so that they stay within NAME_MAX.
STAGING_NAME_CHARS = 100


def marker_text(**fields: Any) -> str:
    """The MARKER file's content: who wrote the folder, plus `fields` (JSON values)."""
    return json.dumps({"written_by": "longrope-convert", "version": __version__, **fields}, indent=2) + "\n"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The fields of a folder's MARKER; None when it has none, {} when it cannot be read."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}


def check_output_folder(output: Path, *, overwrite: bool, protected: Mapping[Path, str] | None = None,
                        read_only: Mapping[Path, str] | None = None, setting: str = "output") -> None:
    """Refuse, before anything is written, an output folder that would harm the user's files.

    protected: {path: what it is}; the output may not be one of these paths or contain one. Paths are
        compared after resolving symlinks, so a Hub snapshot's links protect the cache blobs they
        point to.
    read_only: {folder: what it is}; the output may not lie inside one (a source is never written to).
    An existing output is replaced only with `overwrite`, and only if it is empty or carries the MARKER.
    The nearest existing folder above the output must be writable and the names must fit. `setting`
    (the argument that gave it: "output", "out", ...) names the output in messages. Raises OutputError, one line naming the path and the reason.
    """
    output = Path(output)
    check_not_protected(output, protected or {}, setting)
    check_outside(output, read_only or {}, setting)
    # os.path's tests, unlike Path's, answer False for names the file system cannot even look up
    if os.path.islink(output):
        raise OutputError(f"{{{setting}}} '{output}' is a symbolic link; give the folder it points to", **_about(setting, output))
    if os.path.lexists(output):
        if not os.path.isdir(output):
            raise OutputError(f"{{{setting}}} '{output}' exists and is not a folder", **_about(setting, output))
        if not overwrite:
            raise OutputError(f"{{{setting}}} '{output}' already exists; pass {{overwrite}} to replace it",
                              **_about(setting, output))
        if read_marker(output) is None and any(output.iterdir()):
            raise OutputError(f"{{{setting}}} '{output}' is not empty and was not written by longrope-convert (it has no "
                              f"{MARKER} file); only such a folder, or an empty one, is replaced: remove it "
                              f"yourself or choose another {{{setting}}}", **_about(setting, output))
    check_writable_place(output)


def check_output_file(output: Path, *, overwrite: bool, protected: Mapping[Path, str] | None = None,
                      read_only: Mapping[Path, str] | None = None, setting: str = "output") -> None:
    """Refuse, before anything is written, an output file that would harm the user's files: one of the
    `protected` paths or inside a `read_only` folder (as for check_output_folder), a folder, or an existing
    file without `overwrite`; the place must be writable. A symbolic link is replaced, never written
    through. Raises OutputError, one line naming the path and the reason."""
    output = Path(output)
    check_not_protected(output, protected or {}, setting)
    check_outside(output, read_only or {}, setting)
    if os.path.isdir(output) and not os.path.islink(output):
        raise OutputError(f"{{{setting}}} '{output}' is a folder; give a file name", **_about(setting, output))
    if os.path.lexists(output) and not overwrite:
        raise OutputError(f"{{{setting}}} '{output}' already exists; pass {{overwrite}} to replace it",
                              **_about(setting, output))
    check_writable_place(output)


def check_not_protected(path: Path, protected: Mapping[Path, str], setting: str) -> None:
    """`path` (given as `setting`) is none of the `protected` paths ({path: what it is}) and contains none,
    symlinks resolved. Raises OutputError."""
    real = Path(os.path.realpath(path))
    for kept_path, what in protected.items():
        kept = Path(os.path.realpath(kept_path))
        if real == kept or real in kept.parents:
            verb = "is" if real == kept else "contains"
            raise OutputError(f"{{{setting}}} '{path}' {verb} {what} ('{kept_path}'), which must not be replaced; "
                              f"choose another {{{setting}}}", **_about(setting, path))


def check_outside(path: Path, read_only: Mapping[Path, str], setting: str) -> None:
    """`path` (given as `setting`) is none of the `read_only` folders ({folder: what it is}) and lies inside none,
    symlinks resolved. Raises OutputError."""
    real = Path(os.path.realpath(path))
    for folder, what in read_only.items():
        kept = Path(os.path.realpath(folder))
        if real == kept or kept in real.parents:
            raise OutputError(f"{{{setting}}} '{path}' lies inside {what} ('{folder}'), which is never written to; "
                              f"choose a {{{setting}}} outside it", **_about(setting, path))


def _about(setting: str, path: Path) -> dict:
    """An OutputError's data: the setting that gave the path, and the path."""
    return {"setting": setting, "value": str(path), "file": path}


def check_writable_place(path: Path) -> None:
    """`path` can be created: the nearest existing folder above it is a writable folder and every
    name still to create fits the file system. Raises OutputError."""
    path = Path(path).absolute()
    missing = [path]
    existing = path.parent
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = existing.parent
    if not os.path.isdir(existing):
        raise OutputError(f"cannot create '{path}': '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise OutputError(f"cannot write in '{existing}': "
                          + ("read-only file system" if read_only else "permission denied"))
    name_max = os.pathconf(existing, "PC_NAME_MAX")
    for folder in missing:
        if len(os.fsencode(folder.name)) > name_max:
            raise OutputError(f"cannot create '{folder.name[:40]}...': the name is longer than the file system's "
                              f"{name_max} bytes")


@contextmanager
def atomic_folder(output: Path, *, overwrite: bool, protected: Mapping[Path, str] | None = None,
                  read_only: Mapping[Path, str] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder that becomes `output` only if the block completes.

    What killed runs left next to `output` is cleaned up first, then the output is checked
    (check_output_folder). The block writes into the staging folder; a MARKER is added if the block
    wrote none. On any error or interruption the staging folder is removed, with the parent folders
    made for it, and an existing output stays as it was. Raises OutputError or the OSError met.
    """
    output = Path(output)
    remove_stale_staging(output)
    check_output_folder(output, overwrite=overwrite, protected=protected, read_only=read_only)
    made = _make_folders(output.parent)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(output, "partial"), dir=output.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
        yield staging
        if not (staging / MARKER).exists():
            (staging / MARKER).write_text(marker_text(), encoding="utf-8")
        _move_into_place(staging, output)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _remove_folders(made)
        raise


@contextmanager
def atomic_file(output: Path, *, overwrite: bool, protected: Mapping[Path, str] | None = None,
                read_only: Mapping[Path, str] | None = None, setting: str = "output") -> Iterator[Path]:
    """Yield the path of an empty staging file that becomes `output` only if the block completes.

    What killed runs left next to `output` is cleaned up first, then the output is checked
    (check_output_file). The block writes the staging file; on any error or interruption it is removed,
    with the parent folders made for it, and an existing output stays as it was. Raises OutputError or
    the OSError met.
    """
    output = Path(output)
    remove_stale_staging(output)
    check_output_file(output, overwrite=overwrite, protected=protected, read_only=read_only, setting=setting)
    with _staging_file(output) as staging:
        yield staging


def write_text_atomically(path: Path, text: str) -> None:
    """Write a UTF-8 text file that is at every moment the old file or the new one: a staging file
    next to it, renamed over it. Missing parent folders are made. Raises the OSError met."""
    path = Path(path)
    remove_stale_staging(path)
    with _staging_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


@contextmanager
def _staging_file(destination: Path) -> Iterator[Path]:
    """A staging file next to `destination` (missing parent folders made), renamed over it when the block
    completes, removed with the folders made for it when the block fails."""
    made = _make_folders(destination.parent)
    staging = None
    try:
        handle, name = tempfile.mkstemp(prefix=_staging_prefix(destination, "partial"), dir=destination.parent)
        os.close(handle)
        staging = Path(name)
        yield staging
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes it private; the output is an ordinary file
        os.replace(staging, destination)
    except BaseException:
        if staging is not None:
            staging.unlink(missing_ok=True)
        _remove_folders(made)
        raise


def remove_stale_staging(destination: Path) -> None:
    """Delete the staging folders and files that killed runs left next to `destination`, and put back
    an output that a killed run had moved aside but not replaced. Entries of live processes stay."""
    destination = Path(destination)
    if not os.path.isdir(destination.parent):
        return
    pattern = re.compile(rf"\.{re.escape(destination.name[:STAGING_NAME_CHARS])}\.(partial|old)-(\d+)-[\w]+")
    for entry in sorted(destination.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or _process_alive(int(match.group(2))):
            continue
        moved_aside = entry / destination.name
        if match.group(1) == "old" and moved_aside.exists() and not os.path.lexists(destination):
            os.replace(moved_aside, destination)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _move_into_place(staging: Path, output: Path) -> None:
    if not os.path.lexists(output):
        os.replace(staging, output)
        return
    retired = Path(tempfile.mkdtemp(prefix=_staging_prefix(output, "old"), dir=output.parent))
    try:
        os.replace(output, retired / output.name)  # EBUSY for a mount point, say
    except BaseException:
        retired.rmdir()
        raise
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(retired / output.name, output)
        retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _staging_prefix(destination: Path, kind: str) -> str:
    return f".{destination.name[:STAGING_NAME_CHARS]}.{kind}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # on Linux, a killed process its parent has not reaped yet is a zombie: dead all the same
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _make_folders(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents; return those made, outermost first."""
    missing = []
    folder = folder.absolute()
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
    except BaseException:
        for folder in reversed(made):
            folder.rmdir()
        raise
    return made


def _remove_folders(made: list[Path]) -> None:
    """Remove the folders _make_folders made, innermost first, as far as they are empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
