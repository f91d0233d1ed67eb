"""Hub sources and pushes, against a real HTTP server on 127.0.0.1 speaking the Hub API (tests/hub_server.py).

huggingface_hub freezes HF_ENDPOINT at import, so every client here is a subprocess with its own
environment: HF_ENDPOINT on the local server, an isolated HF_HOME, Xet off, and a token.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

from hub_server import HubServer
from longrope_convert.convert import write_checkpoint
from longrope_convert.errors import LongRoPEError
from longrope_convert.factors import analytic_factor_set
from longrope_convert.source import read_source

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"
TOKEN = "hf_TESTtokenNeverShown0123456789"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub")).start()
    yield server
    server.shutdown()


def publish(hub, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None, gated: bool = False) -> str:
    """Put a checkpoint folder on the server as a source repo, plus files a download must skip."""
    hub.store.create(repo_id, gated=gated)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files.update(extra or {})
    return hub.store.upload(repo_id, files)


@pytest.fixture
def env(hub, tmp_path):
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}


def run(env, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longrope_convert", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True)


def branch_head(hub, repo_id, branch="main"):
    repo = hub.store.load(repo_id)
    return repo["branches"][branch], len(repo["commits"])


def remote_files(hub, repo_id, branch="main") -> dict[str, dict]:
    repo = hub.store.load(repo_id)
    return repo["commits"][repo["branches"][branch]]["files"]


def remote_text(hub, repo_id, path, branch="main") -> str:
    return hub.store.blob(remote_files(hub, repo_id, branch)[path]["blob"]).decode()


SKIPPED = {"pytorch_model.bin": b"pickle, never fetched", "original/consolidated.00.pth": b"pickle too",
           "README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n"}


def test_convert_from_hub_id_downloads_only_what_is_needed(hub, env, tmp_path):
    publish(hub, "org/tiny", TESTBED, SKIPPED)
    done = run(env, "org/tiny", "--target", 1024, "--factors", "yarn", "--output", tmp_path / "out", "--json")
    assert done.returncode == 0, done.stderr
    downloaded = {p.name for p in (tmp_path / "hf-home").rglob("*") if p.is_file() and "snapshots" in p.parts}
    assert downloaded == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "README.md"}
    gets = [r["path"] for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert not any("pytorch_model.bin" in path or "original" in path for path in gets)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: org/tiny" in card and "license: apache-2.0" in card
    cached = next((tmp_path / "hf-home").rglob("snapshots/*/model.safetensors"))  # a symlink to the cache blob
    assert os.stat(tmp_path / "out" / "model.safetensors").st_ino == os.stat(cached).st_ino  # hard-linked to it


def test_push_is_one_commit_and_an_unchanged_push_makes_none(hub, env, tmp_path):
    publish(hub, "org/tiny-push", TESTBED)
    args = ["org/tiny-push", "--target", 1024, "--factors", "pi", "--output", tmp_path / "out", "--push-to",
            "me/tiny-push-1k", "--json"]
    first = run(env, *args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)["push"]
    assert summary["changed"] and summary["url"] == f"{hub.url}/me/tiny-push-1k"
    head, commits = branch_head(hub, "me/tiny-push-1k")
    assert head == summary["commit"] and commits == 2  # the repo's initial commit, then exactly one
    files = hub.store.load("me/tiny-push-1k")["commits"][head]["files"]
    assert set(files) == {p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")}  # the marker stays local
    assert files["model.safetensors"]["lfs"] and files["config.json"]["lfs"] is None
    assert f'from_pretrained("me/tiny-push-1k", trust_remote_code=True, revision="{head}")' in first.stderr
    assert 'from_pretrained("me/tiny-push-1k", trust_remote_code=True)' in (tmp_path / "out" / "README.md").read_text()

    again = run(env, *args[:-1], "--overwrite", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["push"] == {**summary, "changed": False}
    assert branch_head(hub, "me/tiny-push-1k") == (head, 2) and "unchanged: no new commit" in again.stderr

    branch = run(env, "org/tiny-push", "--target", 2048, "--factors", "pi", "--output", tmp_path / "out2",
                 "--push-to", "me/tiny-push-1k", "--branch", "longrope", "--commit-message", "hello")
    assert branch.returncode == 0, branch.stderr
    repo = hub.store.load("me/tiny-push-1k")
    assert repo["branches"]["main"] == head and repo["commits"][repo["branches"]["longrope"]]["message"] == "hello"
    snippet = 'from_pretrained("me/tiny-push-1k", trust_remote_code=True, revision="longrope")'
    assert snippet in remote_text(hub, "me/tiny-push-1k", "README.md", "longrope")  # not main's checkpoint
    assert snippet in (tmp_path / "out2" / "README.md").read_text()


def test_push_mirrors_the_folder_after_eval_card(hub, env, tmp_path):
    """Conversion A (one weight file) is pushed; the user adds a file on the Hub; conversion B of the
    same model in shards is evaluated with --card and pushed with the push command: the repo holds B,
    and no weight file of A that a loader would pick first."""
    first = run(env, TESTBED, "--target", 1024, "--factors", "pi", "--output", tmp_path / "a", "--push-to",
                "me/mirror")
    assert first.returncode == 0, first.stderr  # a local source: no base_model the Hub would refuse
    hub.store.upload("me/mirror", {"notes.md": b"the user's own file"}, message="notes")
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(TESTBED).save_pretrained(sharded, max_shard_size="4MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TESTBED / name, sharded / name)
    assert run(env, sharded, "--target", 1024, "--factors", "pi", "--output", tmp_path / "b").returncode == 0
    evaluated = run(env, "eval", tmp_path / "b", "--passkey-lengths", 200, "--depths", 0.5, "--trials", 1, "--card")
    assert evaluated.returncode == 0, evaluated.stderr
    commits = branch_head(hub, "me/mirror")[1]
    pushed = run(env, "push", tmp_path / "b", "--to", "me/mirror", "--json")
    assert pushed.returncode == 0, pushed.stderr
    summary = json.loads(pushed.stdout)
    local = {p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*")
             if p.is_file() and not p.name.startswith(".")}  # the markers stay local
    assert {"model-00001-of-00003.safetensors", "model.safetensors.index.json", "eval/passkey.png"} <= local
    assert set(remote_files(hub, "me/mirror")) == local | {"notes.md"}
    assert summary["deleted"] == ["model.safetensors"] and summary["kept"] == ["notes.md"]
    assert "deleted from me/mirror in the same commit (files of an earlier conversion that this folder does not " \
           "have): model.safetensors" in pushed.stderr and "kept in me/mirror (not conversion outputs): notes.md" \
           in pushed.stderr
    assert branch_head(hub, "me/mirror") == (summary["commit"], commits + 1)
    card = remote_text(hub, "me/mirror", "README.md")
    assert card == (tmp_path / "b" / "README.md").read_text() and "## Evaluation" in card
    assert 'from_pretrained("me/mirror", trust_remote_code=True)' in card
    again = run(env, "push", tmp_path / "b", "--to", "me/mirror", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False
    assert branch_head(hub, "me/mirror") == (summary["commit"], commits + 1)


def test_one_command_searches_converts_evaluates_and_pushes(hub, env, tmp_path):
    """`longrope-convert SOURCE --target N --search --data D --eval-lengths ... --push-to R`: a Hub source is
    searched (log and factor file next to the output), converted with the searched set, evaluated on other
    text and pushed; the card and the pushed config carry the searched factors and their provenance."""
    publish(hub, "org/tiny-search", TESTBED)
    data = Path(__file__).parent / "data"
    output = tmp_path / "tiny-1k"
    done = run(env, "org/tiny-search", "--target", 1024, "--search", "--data", data / "tom_sawyer_chapters.jsonl",
               "--documents", 1, "--max-evals", 3, "--eval-lengths", "512,1024", "--eval-data",
               data / "sherlock_adventures.jsonl", "--output", output, "--push-to", "me/tiny-searched", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    factors_file = tmp_path / "tiny-1k.factors.json"
    searched = json.loads(factors_file.read_text())
    assert summary["search"]["factors"] == str(factors_file) and (tmp_path / "tiny-1k.factors.json.log.jsonl").exists()
    method = searched["provenance"]["method"]
    assert method == summary["search"]["method"] and method.startswith(("search", "baseline:"))
    assert json.loads((output / "longrope_factors.json").read_text()) == searched
    config = json.loads(remote_text(hub, "me/tiny-searched", "config.json"))
    assert config["rope_scaling"]["long_factor"] == searched["long_factor"] and config["max_position_embeddings"] == 1024
    card = remote_text(hub, "me/tiny-searched", "README.md")
    assert card == (output / "README.md").read_text() and "## Evaluation" in card and f"`{method}`" in card
    assert "tom_sawyer_chapters.jsonl" in card  # the search data, from the provenance
    assert set(summary["eval"]["perplexity"]["perplexity"]) >= {"LongRoPE" if method == "search" else
                                                               f"LongRoPE ({method})", "none", "pi", "ntk", "yarn",
                                                               "llama3"}
    assert "eval/results.json" in remote_files(hub, "me/tiny-searched")
    assert summary["push"]["repo"] == "me/tiny-searched"


@pytest.mark.parametrize("arguments, message", [
    (["--data", "books"], "--data applies to --search"),
    (["--max-evals", "3"], "--max-evals applies to --search"),
    (["--search", "--factors", "yarn", "--data", "books"], "--search finds the factors: drop --factors"),
    (["--search"], "--search needs --data"),
    (["--eval-lengths", "512"], "--eval-lengths and --eval-data go together"),
    (["--factors", "pi", "--private"], "--private applies to --push-to"),
    (["--factors", "pi", "--branch", "b"], "--branch applies to --push-to"),
    (["--no-n-hat"], "--n-hat applies to --search"),
    (["--eval-lengths", "4096", "--eval-data", "books"], "--eval-lengths must lie between 2 and --target 1024"),
])
def test_one_command_refuses_options_that_do_not_go_together(env, tmp_path, arguments, message):
    done = run(env, TESTBED, "--target", 1024, "--output", tmp_path / "out", *arguments)
    assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1], done.stderr
    assert not (tmp_path / "out").exists()


def pi_checkpoint(output: Path, front_matter: str = "") -> Path:
    """The testbed converted to 1024 with PI, its card's front matter starting with `front_matter` lines."""
    source = read_source(TESTBED)
    folder = write_checkpoint(source, analytic_factor_set("pi", source.fingerprint, 1024), output, "init:pi").output
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("library_name:", f"{front_matter}library_name:", 1))
    return folder


def test_a_card_the_hub_refuses_is_one_line_and_creates_nothing(hub, env, tmp_path):
    folder = pi_checkpoint(tmp_path / "out", front_matter="datasets:\n- ./books\n")
    done = run(env, "push", folder, "--to", "me/refused")
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f'error: the Hub refuses the metadata of {folder / "README.md"}: "datasets[0]" with value "./books" is not '
        "valid. If possible, use a dataset id from https://hf.co/datasets; fix its front matter and push again "
        "(nothing was created)"]
    assert hub.store.load("me/refused") is None
    assert not any(r["path"] == "/api/repos/create" and "refused" in json.dumps(r) for r in hub.requests)


def test_a_card_that_is_not_yaml_and_a_push_onto_the_base_model_are_one_line_and_create_nothing(hub, env, tmp_path):
    folder = pi_checkpoint(tmp_path / "out", front_matter="license: [x\n")
    done = run(env, "push", folder, "--to", "me/not-yaml")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "front matter is not valid YAML" in done.stderr and hub.store.load("me/not-yaml") is None
    done = run(env, "push", folder, "--to", "bad id!!")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and "is not a valid repo id" in done.stderr

    publish(hub, "org/base", TESTBED)
    converted = run(env, "org/base", "--target", 1024, "--factors", "pi", "--output", tmp_path / "converted")
    assert converted.returncode == 0, converted.stderr
    before = branch_head(hub, "org/base")
    done = run(env, "push", tmp_path / "converted", "--to", "org/base")
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"error: 'org/base' is the base model {tmp_path / 'converted'} was converted from (its card's base_model); "
        "push the converted checkpoint to a repo of its own"]
    assert branch_head(hub, "org/base") == before


def test_a_failed_push_removes_the_repo_or_branch_it_created(hub, env, tmp_path):
    folder = pi_checkpoint(tmp_path / "out")
    hub.store.create("me/kept")
    before = hub.store.load("me/kept")
    hub.refuse_commits = "storage quota exceeded"
    try:
        created = run(env, "push", folder, "--to", "me/created")
        branch = run(env, "push", folder, "--to", "me/kept", "--branch", "dev")
    finally:
        hub.refuse_commits = None
    for done, repo in ((created, "me/created"), (branch, "me/kept")):
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: the Hub refused the request for '{repo}': 403 Forbidden: storage quota exceeded.")
    assert hub.store.load("me/created") is None and hub.store.load("me/kept") == before


def test_interrupted_push_leaves_the_repo_as_it_was_and_a_rerun_succeeds(hub, env, tmp_path):
    publish(hub, "org/tiny-drop", TESTBED)
    hub.store.create("me/tiny-drop-1k")
    before = branch_head(hub, "me/tiny-drop-1k")
    args = ["org/tiny-drop", "--target", 1024, "--output", tmp_path / "out", "--push-to", "me/tiny-drop-1k"]
    hub.drop_commits = True
    try:
        failed = run(env, *args)
    finally:
        hub.drop_commits = False
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1] == (
        f"error: the connection to {hub.url} failed while pushing to 'me/tiny-drop-1k'; nothing was committed: "
        "run the command again")
    assert branch_head(hub, "me/tiny-drop-1k") == before
    rerun = run(env, *args, "--overwrite")
    assert rerun.returncode == 0, rerun.stderr
    assert branch_head(hub, "me/tiny-drop-1k")[1] == before[1] + 1


@pytest.mark.parametrize("case", ["gated", "missing repo", "missing revision", "pickle only", "no network",
                                  "offline, not cached"])
def test_hub_errors_are_one_clear_line(hub, env, tmp_path, case):
    source, extra = "org/tiny-errors", []
    if case == "gated":
        publish(hub, "org/tiny-gated", TESTBED, gated=True)
        source = "org/tiny-gated"
    elif case == "missing repo":
        source = "nobody/nothing"
    elif case == "missing revision":
        publish(hub, "org/tiny-rev", TESTBED)
        source, extra = "org/tiny-rev", ["--revision", "v9"]
    elif case == "pickle only":
        hub.store.create("org/tiny-pickle")
        hub.store.upload("org/tiny-pickle", {"config.json": (TESTBED / "config.json").read_bytes(),
                                             "pytorch_model.bin": b"pickle"})
        source = "org/tiny-pickle"
    elif case == "no network":
        env = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on the discard port
    elif case == "offline, not cached":
        env = {**env, "HF_HUB_OFFLINE": "1"}
    done = run(env, source, "--target", 1024, *extra, "--output", tmp_path / "out")
    expected = {
        "gated": f"'org/tiny-gated' is a gated repo and this account has no access: accept its licence at "
                 f"{hub.url}/org/tiny-gated, then log in with `hf auth login` or set HF_TOKEN",
        "missing repo": f"no model repo 'nobody/nothing' on {hub.url} (if it is private, log in",
        "missing revision": "'org/tiny-rev' has no revision 'v9' (give a branch, tag or commit)",
        "pickle only": "'org/tiny-pickle' has only pickle weights (pytorch_model.bin); longrope-convert never loads",
        "no network": "cannot reach http://127.0.0.1:9 to get 'org/tiny-errors' (no network?)",
        "offline, not cached": "HF_HUB_OFFLINE is set and 'org/tiny-errors' is not in the local cache",
    }[case]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and lines[-1].startswith("error: " + expected), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_offline_mode_uses_the_cache(hub, env, tmp_path):
    publish(hub, "org/tiny-offline", TESTBED)
    assert run(env, "org/tiny-offline", "--target", 1024, "--output", tmp_path / "a").returncode == 0
    served = len(hub.requests)
    done = run({**env, "HF_HUB_OFFLINE": "1"}, "org/tiny-offline", "--target", 1024, "--output", tmp_path / "b")
    assert done.returncode == 0, done.stderr
    assert len(hub.requests) == served
    assert (tmp_path / "b" / "config.json").read_text() == (tmp_path / "a" / "config.json").read_text()


def test_dry_run_reports_sizes_and_touches_nothing(hub, env, tmp_path):
    publish(hub, "org/tiny-dry", TESTBED, SKIPPED)
    done = run(env, "org/tiny-dry", "--target", 1024, "--push-to", "me/tiny-dry", "--dry-run", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    weights = (TESTBED / "model.safetensors").stat().st_size
    assert {item["file"]: item["bytes"] for item in plan["download"]}["model.safetensors"] == weights
    assert not any(item["file"].endswith((".bin", ".pth")) for item in plan["download"])
    written = {item["file"]: item for item in plan["write"]}
    assert written["model.safetensors"] == {"file": "model.safetensors", "bytes": weights, "how": "hard link"}
    assert {"config.json", "README.md", "longrope_factors.json", "modeling_longrope_llama.py"} <= set(written)
    assert plan["push"] == {"repo": "me/tiny-dry", "branch": "main", "private": False, "files": len(written),
                            "bytes": plan["write_bytes"]}
    assert plan["output"] == "tiny-dry-longrope-1k" and "WARNING: no searched factors" in done.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf-home"] == []
    cached = [p for p in (tmp_path / "hf-home").rglob("*") if p.is_file() and {"snapshots", "blobs"} & set(p.parts)]
    assert cached == []
    assert not (tmp_path / "tiny-dry-longrope-1k").exists() and hub.store.load("me/tiny-dry") is None


def test_the_token_never_leaves_the_authorization_header(hub, env, tmp_path):
    publish(hub, "org/tiny-token", TESTBED)
    done = run(env, "org/tiny-token", "--target", 1024, "--output", tmp_path / "out", "--push-to", "me/tiny-token",
               "--json")
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for path in hub.store.root.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert any(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)


def test_disk_full_is_one_clear_line():
    from longrope_convert.hub import hub_errors

    with pytest.raises(LongRoPEError, match=r"^disk full while downloading 'org/x' to .*: free space or point HF_HOME"):
        with hub_errors("org/x"):
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.real_model
def test_hub_round_trip_with_smollm2(hub, env, tmp_path, smollm2_dir):
    """SmolLM2 uploaded as a source repo; convert + push in one command; the pushed repo loads from the
    server and generates exactly what the local conversion generates."""
    publish(hub, "HuggingFaceTB/SmolLM2-135M", smollm2_dir, SKIPPED)
    done = run(env, "HuggingFaceTB/SmolLM2-135M", "--target", 16384, "--output", tmp_path / "hub-out", "--push-to",
               "me/SmolLM2-135M-LongRoPE-16k", "--json")
    assert done.returncode == 0, done.stderr
    commit = json.loads(done.stdout)["push"]["commit"]
    local = run(env, smollm2_dir, "--target", 16384, "--output", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    generate = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "kw = dict(revision=sys.argv[2]) if len(sys.argv) > 2 else {}\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32, **kw)\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], **kw)\n"
        "ids = tokenizer('Sherlock Holmes took his bottle from the corner of the', return_tensors='pt').input_ids\n"
        "out = model.generate(ids, max_new_tokens=12, do_sample=False)\n"
        "print(type(model).__name__, out[0].tolist())\n")
    from_hub = subprocess.run([sys.executable, "-c", generate, "me/SmolLM2-135M-LongRoPE-16k", commit], env=env,
                              capture_output=True, text=True)
    from_folder = subprocess.run([sys.executable, "-c", generate, str(tmp_path / "local")], env=env,
                                 capture_output=True, text=True)
    assert from_hub.returncode == 0, from_hub.stderr
    assert from_hub.stdout == from_folder.stdout and from_hub.stdout.startswith("LongRoPELlamaForCausalLM [")
    assert any("/me/SmolLM2-135M-LongRoPE-16k/resolve/" in r["path"] for r in hub.requests)


def test_push_of_a_folder_not_converted_says_so_before_asking_for_a_login(tmp_path):
    """A wrong folder is named as such first: no token and no Hub are needed to learn it."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    done = subprocess.run([sys.executable, "-m", "longrope_convert", "push", str(TESTBED), "--to", "me/x"],
                          capture_output=True, text=True, env={**env, "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"'{TESTBED}' is not a checkpoint written by longrope-convert" in done.stderr
    assert "login" not in done.stderr
