"""The modeling tests under the oldest supported transformers release and one in the middle (5.17: what the
GPU machine has), each in a subprocess with that release first on the path; the current release runs them in
the main session."""

import pytest

from transformers_releases import run_python

MODELING_TESTS = ["tests/test_modeling.py", "tests/test_generate_parity.py", "tests/test_source_rope.py",
                  "tests/test_readers.py"]


@pytest.mark.parametrize("version", ["5.3.0", "5.17.0"])
def test_modeling_tests_pass_under_another_release(version):
    run = run_python(
        version, "-c",
        "import sys, pytest, transformers\n"
        f"assert transformers.__version__ == {version!r}, transformers.__file__\n"
        # The 4.x readers run in their own subprocesses from the main session.
        f"sys.exit(pytest.main([*{MODELING_TESTS!r}, '-q', '-p', 'no:cacheprovider', '-k', 'not transformers_4']))",
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
