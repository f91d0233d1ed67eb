"""The package's layout: modules in floors, as the README's Architecture section draws them (no import circle,
no import pointing back up, light modules kept light), and the lists of checkpoint files kept once and agreeing
with what conversion does."""

import ast
import fnmatch
import graphlib
import json
import re
import subprocess
import sys
from pathlib import Path

import longrope_convert

from longrope_convert.checkpoint_files import COPIED_FILES, PICKLE_PATTERNS, SOURCE_FILES, is_conversion_output
from longrope_convert.convert import plan_checkpoint
from longrope_convert.factors import analytic_factor_set
from longrope_convert.source import read_source

PACKAGE = Path(longrope_convert.__file__).parent
README = PACKAGE.parent / "README.md"
HEAVY = {"torch", "transformers", "huggingface_hub", "numpy", "gguf", "matplotlib", "yaml", "safetensors"}


def package_imports() -> dict[str, set[str]]:
    """{module: the package modules it imports}, from its source: every relative import, at the top or inside a
    function (an import made late still ties the two modules)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    imports = {}
    for module in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                found |= {name.split(".")[0] for name in names} & modules  # `from . import __version__`: the package
        imports[module] = found - {module}
    return imports


def readme_floors() -> list[list[str]]:
    """The modules on each floor of the README's Architecture block, ground floor first (a line that starts with a
    module name opens a floor; indented lines continue its description)."""
    section = README.read_text(encoding="utf-8").split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    floors = []
    for line in block.splitlines():
        if line and not line[0].isspace():
            floors.append(re.findall(r"(\w+)\.py", re.match(r"[\w.]+(?:, [\w.]+)*", line).group(0)))
    return floors


def test_the_package_is_built_in_the_floors_the_readme_draws():
    """Each module is on one floor of README.md's Architecture section and imports only from floors below it."""
    imports, floors = package_imports(), readme_floors()
    floor_of = {module: number for number, floor in enumerate(floors) for module in floor}
    listed = [module for floor in floors for module in floor]
    assert sorted(listed) == sorted(set(listed)) == sorted(imports), "README's Architecture lists each module once"
    upward = sorted(f"{module} -> {imported} (floor {floor_of[module]} -> {floor_of[imported]})"
                    for module, found in imports.items() for imported in found if floor_of[imported] >= floor_of[module])
    assert upward == [], "imports on or above a module's own floor"


def test_the_package_has_no_import_circle():
    try:
        list(graphlib.TopologicalSorter(package_imports()).static_order())
    except graphlib.CycleError as error:
        raise AssertionError(f"import circle: {' -> '.join(error.args[1])}") from None


def loaded_by(module: str) -> tuple[set[str], set[str]]:
    """(the package modules, the heavy libraries) a fresh interpreter has loaded after importing `module`."""
    done = subprocess.run([sys.executable, "-c", f"import sys, longrope_convert.{module}; print(*sorted(sys.modules))"],
                          capture_output=True, text=True, check=True)
    names = done.stdout.split()
    return ({name for name in names if name.startswith("longrope_convert.")},
            {name.split(".")[0] for name in names} & HEAVY)


def test_the_data_reader_and_the_conversion_stay_light():
    """Checking --data before a model loads needs neither torch nor the Hub client; conversion never imports torch,
    so its memory stays flat whatever the model size."""
    package, heavy = loaded_by("documents")
    assert package == {"longrope_convert.documents", "longrope_convert.errors", "longrope_convert.hub"}
    assert heavy == set()
    package, heavy = loaded_by("cli")  # every command's module, as `longrope-convert convert` loads it
    assert "longrope_convert.convert" in package and not heavy & {"torch", "transformers", "numpy"}


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
