"""The public Python API: README's "Python API" section runs as written, the package and the CLI's help load no
torch, every public function is keyword-only and documented, and the CLI imports nothing but the API and the
error types."""

import ast
import contextlib
import inspect
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import longrope_convert
from longrope_convert import api

REPOSITORY = Path(longrope_convert.__file__).parent.parent
FUNCTIONS = ("convert_checkpoint", "plan_job", "search_factors", "evaluate_checkpoint", "push_checkpoint",
             "export_gguf")


def readme_python_blocks(section: str) -> list[str]:
    text = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in body.split("```python\n")[1:]]


def test_the_readme_python_api_section_runs_as_written(tmp_path, monkeypatch):
    """In a folder laid out as the repository root (its testbed and data linked, so outputs land in tmp_path)."""
    (tmp_path / "tests" / "testbed").mkdir(parents=True)
    (tmp_path / "tests" / "testbed" / "tiny-llama-256").symlink_to(REPOSITORY / "tests" / "testbed" / "tiny-llama-256")
    (tmp_path / "tests" / "data").symlink_to(REPOSITORY / "tests" / "data")
    monkeypatch.chdir(tmp_path)
    blocks = readme_python_blocks("Python API")
    assert blocks
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, "README.md (Python API)", "exec"), {})
    caps = next(line for line in printed.getvalue().splitlines() if line.startswith("search: "))
    assert "at most 18 document forwards of 1024 tokens" in caps  # the number the README's comment states
    output = tmp_path / "tiny-llama-256-longrope-1k"
    config = json.loads((output / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "longrope" and config["max_position_embeddings"] == 1024
    results = json.loads((output / "eval" / "results.json").read_text())
    assert set(results["perplexity"]["perplexity"]) >= {"none", "pi", "yarn"}
    assert (tmp_path / "tiny-llama-256-longrope-1k.factors.json").is_file()
    assert (tmp_path / "tiny-llama-256-longrope-1k-eval" / "results.json").is_file()


def test_the_package_and_the_cli_help_load_no_torch():
    """A Python user's `import longrope_convert` and every `longrope-convert --help` stay light: torch loads only
    when a search or an evaluation runs."""
    script = ("import sys\n"
              "import longrope_convert\n"
              "from longrope_convert import convert_checkpoint, search_factors, evaluate_checkpoint, export_gguf\n"
              "from longrope_convert.cli import cli\n"
              "for command in ([], ['convert'], ['search'], ['eval'], ['gguf'], ['push']):\n"
              "    try:\n"
              "        cli.main([*command, '--help'], standalone_mode=False)\n"
              "    except SystemExit:\n"
              "        pass\n"
              "print(sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'transformers', 'numpy'}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_names_the_api_and_each_function_is_keyword_only_and_documented():
    assert tuple(api.__all__) == longrope_convert.API
    assert all(getattr(longrope_convert, name) is getattr(api, name) for name in api.__all__)
    for name in FUNCTIONS:
        function = getattr(longrope_convert, name)
        parameters = inspect.signature(function).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters), name
        assert "status" in inspect.signature(function).parameters, name
    for name in FUNCTIONS:
        doc = inspect.getdoc(getattr(longrope_convert, name))
        assert all(part in doc for part in ("Returns:", "Raises:", "Example:")), name


def test_the_cli_imports_only_the_public_api_and_the_error_types():
    """The commands parse, call the API and print: cli.py's package imports are the API, errors and __version__."""
    tree = ast.parse((REPOSITORY / "longrope_convert" / "cli.py").read_text(encoding="utf-8"))
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("longrope_convert")):
            imported.setdefault(node.module, set()).update(alias.name for alias in node.names)
    assert set(imported) <= {None, "api", "errors"}, imported
    assert imported.get(None, set()) <= {"__version__"}
    assert imported.get("api", set()) <= set(api.__all__)


def test_errors_carry_the_setting_the_value_and_the_bound_and_the_cli_words_them_as_flags(tmp_path, capfd,
                                                                                          monkeypatch):
    from longrope_convert import cli
    from longrope_convert.errors import TargetError

    testbed = REPOSITORY / "tests" / "testbed" / "tiny-llama-256"
    try:
        longrope_convert.convert_checkpoint(source=testbed, target=128, output=tmp_path / "out")
    except TargetError as error:
        assert (error.setting, error.value, error.bound) == ("target", 128, 256)
        assert str(error) == "target 128 must be larger than the source's context window 256"
    else:
        raise AssertionError("a target within the window was accepted")
    monkeypatch.setattr(sys, "argv", ["longrope-convert", str(testbed), "--target", "128", "--output",
                                      str(tmp_path / "out")])
    try:
        cli.main()
    except SystemExit as exit:
        assert exit.code == 1
    assert capfd.readouterr().err.splitlines()[-1] == (
        "error: --target 128 must be larger than the source's context window 256")
    assert not (tmp_path / "out").exists()
