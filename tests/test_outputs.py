"""Output locations and atomic writes: what may be replaced, what a failure or a killed run leaves."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from longrope_convert.errors import OutputError
from longrope_convert.outputs import (
    MARKER,
    atomic_file,
    atomic_folder,
    check_output_folder,
    marker_text,
    read_marker,
    remove_stale_staging,
    write_text_atomically,
)


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "models" / "llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("where, message", [
    ("{source}", "is the source"),
    ("{source}/out", "lies inside the source"),
    ("{models}", "contains the source"),
])
def test_an_output_at_or_around_the_source_is_refused(source, where, message):
    output = Path(where.format(source=source, models=source.parent))
    with pytest.raises(OutputError, match=message):
        check_output_folder(output, overwrite=True, protected={source: "the source"}, read_only={source: "the source"})


def test_links_are_followed_to_what_they_protect(source, tmp_path):
    """A Hub snapshot holds links to cache blobs: an output containing a blob is refused."""
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "0123abcd").write_bytes(b"weights")
    (source / "model.safetensors").symlink_to(blobs / "0123abcd")
    (tmp_path / "cache" / MARKER).write_text(marker_text())  # even a folder that looks like ours
    protected = {source / "model.safetensors": "a file of the source"}
    with pytest.raises(OutputError, match=r"contains a file of the source \('.*model.safetensors'\)"):
        check_output_folder(tmp_path / "cache", overwrite=True, protected=protected)
    link = tmp_path / "link"
    link.symlink_to(source)
    with pytest.raises(OutputError, match="is the source"):
        check_output_folder(link, overwrite=True, protected={source: "the source"})


def test_overwrite_replaces_only_an_empty_or_marked_folder(tmp_path):
    mine, theirs, empty = tmp_path / "mine", tmp_path / "theirs", tmp_path / "empty"
    for folder in (mine, theirs, empty):
        folder.mkdir()
    (mine / MARKER).write_text(marker_text())
    (theirs / "notes.txt").write_text("keep me")
    check_output_folder(mine, overwrite=True)
    check_output_folder(empty, overwrite=True)
    with pytest.raises(OutputError, match="was not written by longrope-convert"):
        check_output_folder(theirs, overwrite=True)
    with pytest.raises(OutputError, match="already exists; pass overwrite"):
        check_output_folder(mine, overwrite=False)


def test_a_failed_block_leaves_nothing_and_keeps_the_old_output(tmp_path):
    output = tmp_path / "made" / "for" / "out"
    with pytest.raises(OSError):
        with atomic_folder(output, overwrite=False) as staging:
            (staging / "config.json").write_text("{}")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # the parent folders made for it are gone too

    with atomic_folder(output, overwrite=False) as staging:
        (staging / "config.json").write_text("old")
    assert read_marker(output)["written_by"] == "longrope-convert"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(output, overwrite=True) as staging:
            (staging / "config.json").write_text("new")
            raise KeyboardInterrupt
    assert (output / "config.json").read_text() == "old" and sorted(os.listdir(output.parent)) == ["out"]


def test_a_later_run_removes_what_a_killed_one_left_and_puts_back_a_moved_output(tmp_path):
    output, pid = tmp_path / "out", dead_pid()
    partial = tmp_path / f".out.partial-{pid}-abc123"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".out.partial-{pid}-x1y2z3").write_text("a staging file")
    moved = tmp_path / f".out.old-{pid}-def456" / "out"  # killed between moving the old output and the rename
    moved.mkdir(parents=True)
    (moved / "config.json").write_text("the previous conversion")
    alive = tmp_path / f".out.partial-{os.getppid()}-ghi789"  # a live process's staging
    alive.mkdir()
    unrelated = tmp_path / ".other.partial-1-abc"
    unrelated.mkdir()

    remove_stale_staging(output)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, unrelated.name, "out"])
    assert (output / "config.json").read_text() == "the previous conversion"


def test_text_files_are_replaced_whole(tmp_path):
    path = tmp_path / "deep" / "factors.json"
    write_text_atomically(path, "first")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "first" and path.stat().st_mode & 0o777 == 0o666 & ~mask

    with pytest.raises(UnicodeEncodeError):  # fails half-way through writing
        write_text_atomically(path, "second " * 10000 + "\ud800")
    assert path.read_text() == "first" and tree(tmp_path) == {"deep/factors.json": b"first"}


def test_a_file_is_staged_checked_and_swept_as_a_folder_is(tmp_path):
    output, pid = tmp_path / "made" / "model.gguf", dead_pid()
    with pytest.raises(OSError):
        with atomic_file(output, overwrite=False) as staging:
            staging.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # the parent folder made for it is gone too

    output.parent.mkdir()
    (output.parent / f".model.gguf.partial-{pid}-abc123").write_bytes(b"left by a killed run")
    with atomic_file(output, overwrite=False) as staging:
        staging.write_bytes(b"old")
    assert tree(tmp_path) == {"made/model.gguf": b"old"}
    with pytest.raises(OutputError, match="already exists; pass overwrite"):
        with atomic_file(output, overwrite=False):
            pass
    with pytest.raises(OutputError, match="is the source"):
        with atomic_file(output, overwrite=True, protected={output: "the source"}):
            pass
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        with atomic_file(output.parent, overwrite=True):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(output, overwrite=True) as staging:
            staging.write_bytes(b"new")
            raise KeyboardInterrupt
    assert tree(tmp_path) == {"made/model.gguf": b"old"}
