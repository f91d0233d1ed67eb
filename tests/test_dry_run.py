"""--dry-run and the real conversion walk one plan: the files listed (names and sizes) are the files
written, and the files listed for download are the files downloaded, for a local folder and a Hub repo
(tests/hub_server.py), with one weight file or with shards."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import TINY_WINDOW, edit_json, tiny_llama_config
from hub_server import HubServer

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"


def make_source(folder: Path, layout: str) -> Path:
    """A tiny Llama with window fields to rewrite, a licence and a card; `layout` "single" or "sharded"
    (shards and index next to a stale model.safetensors, which conversion must ignore)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    if layout == "sharded":
        model.save_pretrained(folder / "single")
        model.save_pretrained(folder, max_shard_size="100KB")
        os.replace(folder / "single" / "model.safetensors", folder / "model.safetensors")
        shutil.rmtree(folder / "single")
    else:
        model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": TINY_WINDOW, "bos_token": "<s>"}))
    edit_json(folder / "generation_config.json", max_length=TINY_WINDOW)
    (folder / "LICENSE").write_text("licence text")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return folder


def written(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def listed(plan: dict) -> dict[str, int]:
    return {item["file"]: item["bytes"] for item in plan["write"]}


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longrope_convert", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_local_dry_run_lists_what_the_real_run_writes(layout, tmp_path):
    source = make_source(tmp_path / "tiny", layout)
    args = [source, "--target", 256, "--factors", "yarn", "--output", tmp_path / "out", "--copy-weights"]
    dry = cli(*args, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert not (tmp_path / "out").exists() and plan["download"] == []
    real = cli(*args)
    assert real.returncode == 0, real.stderr
    assert listed(plan) == written(tmp_path / "out")
    weights = {name for name in listed(plan) if "safetensors" in name}
    if layout == "sharded":  # the index's shards, not the stale single file
        assert "model.safetensors" not in weights and len(weights) > 2
    assert {item["file"]: item["how"] for item in plan["write"]}["tokenizer_config.json"] == "write"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub")).start()
    yield server
    server.shutdown()


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_hub_dry_run_lists_what_the_real_run_downloads_and_writes(layout, hub, tmp_path):
    source = make_source(tmp_path / "tiny", layout)
    repo = f"org/tiny-{layout}"
    hub.store.create(repo)
    hub.store.upload(repo, {p.name: p.read_bytes() for p in source.iterdir()} | {"pytorch_model.bin": b"pickle"})
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
           "HF_TOKEN": "hf_TESTtoken", "HF_HUB_DISABLE_TELEMETRY": "1"}
    args = [repo, "--target", 256, "--factors", "yarn", "--output", tmp_path / "out"]
    dry = cli(*args, "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert not list((tmp_path / "hf-home").rglob("blobs/*"))  # the plan read remotely, cached nothing

    real = cli(*args, env=env)
    assert real.returncode == 0, real.stderr
    assert listed(plan) == written(tmp_path / "out")
    snapshot = next((tmp_path / "hf-home").rglob("snapshots/*"))
    assert {item["file"]: item["bytes"] for item in plan["download"]} == {
        p.name: p.stat().st_size for p in snapshot.iterdir()}
    downloaded = {item["file"] for item in plan["download"]}
    assert ("model.safetensors" in downloaded) == (layout == "single") and "pytorch_model.bin" not in downloaded


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
                    reason="needs /dev/shm on another file system than /tmp")
def test_the_dry_run_says_copy_where_the_real_run_cannot_link(tmp_path):
    source = make_source(tmp_path / "tiny", "single")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as elsewhere:
        args = [source, "--target", 256, "--factors", "yarn", "--output", Path(elsewhere) / "out", "--json"]
        dry = cli(*args, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert {item["file"]: item["how"] for item in json.loads(dry.stdout)["write"]}["model.safetensors"] == "copy"
        real = cli(*args)
        assert real.returncode == 0 and json.loads(real.stdout)["weights"]["mode"] == "copy", real.stderr


def test_a_dry_run_shows_the_whole_job_with_the_search_caps_and_the_evaluation(tmp_path):
    """--search, --gguf and --eval-lengths in a dry run: the search's caps (the line the search prints first), what
    the evaluation measures, and nothing written."""
    data = Path(__file__).parent / "data"
    dry = cli(TESTBED, "--target", 1024, "--output", tmp_path / "out", "--search", "--data",
              data / "tom_sawyer_chapters.jsonl", "--documents", 2, "--max-evals", 4, "--gguf", "*.gguf",
              "--eval-lengths", "512,1024", "--eval-data", data / "sherlock_adventures.jsonl", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["search"]["caps"].startswith("search: preset default")
    assert "at most 18 document forwards of 1024 tokens" in plan["search"]["caps"]  # 4 x 2, and 5 baselines x 2
    assert plan["search"]["factors"] == str(tmp_path / "out.factors.json") and plan["gguf"] == "*.gguf"
    assert plan["evaluation"]["lengths"] == [512, 1024]
    assert plan["evaluation"]["measurements"] == 2 * len(plan["evaluation"]["methods"])
    assert any(line.startswith("dry run: search: preset default") for line in dry.stderr.splitlines())
    assert list(tmp_path.iterdir()) == []
