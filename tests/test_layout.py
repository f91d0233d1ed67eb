"""The package's layout: the lists of checkpoint files kept once and agreeing with what conversion does."""

import fnmatch
import json
from pathlib import Path

from longrope_convert.checkpoint_files import COPIED_FILES, PICKLE_PATTERNS, SOURCE_FILES, is_conversion_output
from longrope_convert.convert import plan_checkpoint
from longrope_convert.factors import analytic_factor_set
from longrope_convert.source import read_source


def test_a_hub_download_takes_exactly_what_conversion_reads(tiny_source, tmp_path):
    """SOURCE_FILES, the only download list, admits every file the plan reads and no other file of the folder."""
    for name in (*COPIED_FILES, "LICENSE", "LICENSE.txt", "USE_POLICY.md", "NOTICE"):
        if not (tiny_source / name).exists():
            (tiny_source / name).write_text("{}" if name.endswith(".json") else "text")
    (tiny_source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    never_read = ["pytorch_model.bin", "consolidated.00.pth", "notes.txt", "params.json", "model.gguf"]
    for name in never_read:
        (tiny_source / name).write_text("not read")
    (tiny_source / "original").mkdir()
    (tiny_source / "original" / "tokenizer.model").write_text("Meta's own copy, not read")
    source = read_source(tiny_source)
    plan = plan_checkpoint(source, analytic_factor_set("pi", source.fingerprint, 256), tmp_path / "out", "init:pi")

    admitted = sorted(path.name for path in tiny_source.iterdir() if path.is_file()
                      and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in SOURCE_FILES))
    assert plan.source_files == admitted
    assert not set(never_read) & set(admitted)
    assert all(not fnmatch.fnmatchcase(name, pattern) for name in admitted for pattern in PICKLE_PATTERNS)


def test_what_a_conversion_writes_is_a_conversion_output(tiny_source, tmp_path):
    """A push and --overwrite treat exactly the files a conversion writes (and eval/) as the tool's."""
    (tiny_source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (tiny_source / "LICENSE").write_text("licence")
    source = read_source(tiny_source)
    plan = plan_checkpoint(source, analytic_factor_set("pi", source.fingerprint, 256), tmp_path / "out", "init:pi")
    written = [item.name for item in plan.files if not item.name.startswith(".")]  # the marker stays local
    assert written and all(is_conversion_output(name) for name in written)
    assert is_conversion_output("eval/results.json")
    assert not any(is_conversion_output(name) for name in ("notes.txt", "sub/config.json", Path("x.gguf").name))
