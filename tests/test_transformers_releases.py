"""The modeling tests under the oldest supported transformers release and one in the middle (5.17: what the
GPU machine has), each in a subprocess with that release first on the path; the installed release (the newest
pip picks for `transformers>=5.3,<6`) runs them in the main session. pytest's header names all three."""

import pytest

from transformers_releases import RELEASES_UNDER_TEST, run_python

MODELING_TESTS = ["tests/test_modeling.py", "tests/test_generate_parity.py", "tests/test_source_rope.py",
                  "tests/test_readers.py", "tests/test_hub_kernels.py"]


@pytest.mark.parametrize("version", RELEASES_UNDER_TEST)
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


def test_the_supported_range_is_stated_the_same_everywhere():
    """setup.cfg, README, the model card, the Hub loading snippet and the shipped code's own check agree."""
    import configparser

    from longrope_convert.card import LOADING_REQUIREMENT
    from longrope_convert.publish import loading_snippet
    from longrope_convert.modeling_longrope_llama import MIN_TRANSFORMERS
    from transformers_releases import REPOSITORY

    minimum = ".".join(map(str, MIN_TRANSFORMERS))
    assert LOADING_REQUIREMENT == f"transformers>={minimum},<6"
    setup = configparser.ConfigParser()
    setup.read(REPOSITORY / "setup.cfg")
    assert LOADING_REQUIREMENT in setup["options"]["install_requires"].split()
    assert f"`{LOADING_REQUIREMENT}`" in (REPOSITORY / "README.md").read_text()
    assert LOADING_REQUIREMENT in loading_snippet("me/model", "abc123", REPOSITORY).splitlines()[0]
    assert RELEASES_UNDER_TEST[0].startswith(f"{minimum}.")


def test_the_installed_release_is_a_supported_one():
    """The main session's release, the third of CI's matrix, is inside the supported range."""
    import transformers
    from packaging.requirements import Requirement

    from longrope_convert.card import LOADING_REQUIREMENT

    assert transformers.__version__ in Requirement(LOADING_REQUIREMENT).specifier
