"""The converter and its command line: output layout, config, weights, atomicity, bad input."""

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from conftest import TINY_WINDOW, edit_json, tiny_llama_config
from longrope_convert import cli, convert, modeling_longrope_llama
from longrope_convert.card import front_matter, refresh_card
from longrope_convert.factors import N_HAT_MSCALE, analytic_factor_set, load_factor_set
from longrope_convert.modeling_longrope_llama import default_long_mscale
from longrope_convert.source import read_source

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"


def run_cli(capfd, monkeypatch, *args) -> tuple[int, str, str]:
    """The command line in this process (its imports are paid once): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["longrope-convert", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capfd.readouterr()
    return exited.value.code, out, err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_conversion_writes_a_complete_checkpoint(tiny_source, tmp_path, capfd, monkeypatch):
    output = tmp_path / "out"
    code, out, err = run_cli(capfd, monkeypatch, tiny_source, "--target", 256, "--factors", "ntk", "--output",
                             output, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["weights"] == {"files": 1, "bytes": (tiny_source / "model.safetensors").stat().st_size,
                                  "mode": "hardlink"}
    assert summary["factors"]["method"] == "init:ntk"
    assert sorted(p.name for p in output.iterdir()) == [
        ".longrope-convert", "README.md", "config.json", "generation_config.json", "longrope_factors.json", "model.safetensors",
        "modeling_longrope_llama.py"]
    assert os.stat(output / "model.safetensors").st_ino == os.stat(tiny_source / "model.safetensors").st_ino
    assert (output / "modeling_longrope_llama.py").read_bytes() == Path(modeling_longrope_llama.__file__).read_bytes()

    config = json.loads((output / "config.json").read_text())
    factor_set = load_factor_set(output / "longrope_factors.json")
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] == 256 and config["rope_theta"] == 10000.0
    assert "rope_parameters" not in config
    assert config["original_max_position_embeddings"] == TINY_WINDOW  # where transformers 4.48-4.57 read it
    assert config["rope_scaling"] == {
        "rope_type": "longrope", "long_factor": factor_set.long_factor, "short_factor": [1.0] * 8,
        "original_max_position_embeddings": TINY_WINDOW, "factor": 4.0, "attention_factor": 1.0,
        "short_mscale": 1.0, "long_mscale": 1.0}  # for vLLM, whose default would be 1.1547
    assert config["longrope"] == {"n_hat": 0, "n_hat_mscale": N_HAT_MSCALE, "short_mscale": 1.0, "method": "init:ntk",
                                  "factors_file": "longrope_factors.json"}
    assert config["auto_map"] == {"AutoModel": "modeling_longrope_llama.LongRoPELlamaModel",
                                  "AutoModelForCausalLM": "modeling_longrope_llama.LongRoPELlamaForCausalLM"}
    assert oct(output.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert leftovers(tmp_path) == []
    # a converted folder gives its factor file
    code, _, err = run_cli(capfd, monkeypatch, tiny_source, "--target", 256, "--factors", output, "--output",
                           tmp_path / "again")
    assert code == 0, err
    assert load_factor_set(tmp_path / "again" / "longrope_factors.json").long_factor == factor_set.long_factor
    # the scale below n_hat is read back from the config; a checkpoint written before the key existed means "row"
    assert read_source(output).longrope.n_hat_mscale == N_HAT_MSCALE
    edit_json(output / "config.json", longrope={key: value for key, value in config["longrope"].items()
                                                if key != "n_hat_mscale"})
    assert read_source(output).longrope.n_hat_mscale == "row"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_model_card_inherits_the_source_licence(tiny_source, tmp_path, capfd, monkeypatch):
    (tiny_source / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n"
                                           "tags: [chat]\n---\n# Source card, not copied\n")
    (tiny_source / "LICENSE").write_text("the licence text")
    assert run_cli(capfd, monkeypatch, tiny_source, "--target", 256, "--output", tmp_path / "out")[0] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert front_matter(card) == {"license": "other", "license_name": "llama3",  # a local source: no base_model
                                  "license_link": "LICENSE", "library_name": "transformers",
                                  "pipeline_tag": "text-generation", "tags": ["longrope", "long-context", "llama"]}
    assert "Source card" not in card and "**not searched**: `init:llama3`" in card
    assert (tmp_path / "out" / "LICENSE").read_text() == "the licence text"


def test_converted_checkpoint_loads_with_and_without_remote_code(tiny_source, tmp_path):
    output = tmp_path / "out"
    source = read_source(tiny_source)
    # a searched set's attention scale (the default): no keys for vLLM, which stock transformers would log as unused
    factor_set = replace(analytic_factor_set("yarn", source.fingerprint, 256), long_mscale=default_long_mscale(4, 64))
    convert.write_checkpoint(source, factor_set, output, "init:yarn")

    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            causal = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
            base = AutoModel.from_pretrained(output, trust_remote_code=True)
            stock = AutoModelForCausalLM.from_pretrained(output)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [r.getMessage() for r in records] == [] and [str(w.message) for w in caught] == []
    assert type(causal).__name__ == "LongRoPELlamaForCausalLM" and type(base).__name__ == "LongRoPELlamaModel"
    assert type(stock) is LlamaForCausalLM and stock.config.rope_parameters["rope_type"] == "longrope"
    rotary = causal.model.rotary_emb
    assert rotary.long_factor == factor_set.long_factor and rotary.long_mscale == factor_set.long_mscale
    ids = torch.randint(3, 256, (1, 100))
    with torch.no_grad():
        assert torch.allclose(base(ids).last_hidden_state, causal.model(ids).last_hidden_state)
        source_logits = LlamaForCausalLM.from_pretrained(tiny_source)(ids[:, :TINY_WINDOW]).logits
        assert torch.equal(causal(ids[:, :TINY_WINDOW]).logits, source_logits)


def test_copy_weights_and_sharded_sources(tmp_path, capfd, monkeypatch):
    torch.manual_seed(0)
    source = tmp_path / "sharded"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(source, max_shard_size="100KB")
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert len(shards) > 1 and (source / "model.safetensors.index.json").is_file()
    (source / shards[0]).chmod(0o600)  # private: the copy must not be readable by others either
    output = tmp_path / "out"
    code, out, err = run_cli(capfd, monkeypatch, source, "--target", 128, "--factors", "pi", "--output", output,
                             "--copy-weights", "--json")
    assert code == 0, err
    assert json.loads(out)["weights"]["mode"] == "copy"
    for name in [*shards, "model.safetensors.index.json"]:
        assert (output / name).read_bytes() == (source / name).read_bytes()
        assert os.stat(output / name).st_ino != os.stat(source / name).st_ino
        assert os.stat(output / name).st_mode == os.stat(source / name).st_mode
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert torch.equal(model.lm_head.weight, LlamaForCausalLM.from_pretrained(source).lm_head.weight)


@pytest.mark.parametrize("style", ["4.x", "5.x"])
def test_both_config_styles_are_read(tiny_source, style):
    if style == "4.x":  # what most Hub checkpoints carry, e.g. Meta-Llama-3-8B
        edit_json(tiny_source / "config.json", rope_parameters=None, rope_theta=500000.0, rope_scaling=None)
    else:
        edit_json(tiny_source / "config.json", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    source = read_source(tiny_source)
    assert source.fingerprint.rope_theta == 500000.0
    config = convert.longrope_config(source.config, analytic_factor_set("pi", source.fingerprint, 128))
    assert config["rope_theta"] == 500000.0 and "rope_parameters" not in config


def test_shipped_factors_are_found_else_the_llama3_init_with_a_warning(tiny_source, tmp_path, capfd, monkeypatch):
    shipped = tmp_path / "shipped" / "tiny"
    shipped.mkdir(parents=True)
    fingerprint = read_source(tiny_source).fingerprint
    factor_set = analytic_factor_set("ntk", fingerprint, 256)
    factor_set.provenance["method"] = "search"
    factor_set.save(shipped / "256.json")
    monkeypatch.setattr("longrope_convert.factors.shipped_factor_dir", lambda: tmp_path / "shipped")
    code, out, err = run_cli(capfd, monkeypatch, tiny_source, "--target", 256, "--output", tmp_path / "a", "--json")
    assert code == 0 and json.loads(out)["factors"] == {"method": "search", "origin": "shipped:tiny/256.json",
                                                        "n_hat": 0}
    assert "WARNING" not in err
    code, out, err = run_cli(capfd, monkeypatch, tiny_source, "--target", 512, "--output", tmp_path / "b", "--json")
    assert code == 0 and json.loads(out)["factors"]["method"] == "init:llama3"
    assert "WARNING: no searched factors ship for this model at 512 tokens" in err
    assert load_factor_set(tmp_path / "b" / "longrope_factors.json").method == "init:llama3"


def test_overwrite_replaces_and_a_failed_run_keeps_the_old_output(tiny_source, tmp_path, capfd, monkeypatch):
    output = tmp_path / "out"
    assert run_cli(capfd, monkeypatch, tiny_source, "--target", 128, "--factors", "pi", "--output", output)[0] == 0
    before = (output / "config.json").read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "link_or_copy", interrupted)
    code, _, err = run_cli(capfd, monkeypatch, tiny_source, "--target", 256, "--factors", "pi", "--output", output,
                           "--overwrite")
    assert code == 130 and err.strip().splitlines()[-1] == "aborted"
    assert (output / "config.json").read_text() == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert run_cli(capfd, monkeypatch, tiny_source, "--target", 256, "--factors", "pi", "--output", output,
                   "--overwrite")[0] == 0
    assert json.loads((output / "config.json").read_text())["max_position_embeddings"] == 256
    assert leftovers(tmp_path) == []


def test_existing_output_is_refused_and_untouched(tiny_source, tmp_path, capfd, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, out, err = run_cli(capfd, monkeypatch, tiny_source, "--target", 256, "--output", output)
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: --output '{output}' already exists; pass --overwrite to replace it")
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []


def test_copied_files_state_the_new_window(tmp_path, capfd, monkeypatch, sherlock_text):
    """The old window in the tokenizer's and generation config's limits would cut long inputs short."""
    source = tmp_path / "testbed"
    shutil.copytree(TESTBED, source)
    edit_json(source / "tokenizer_config.json", model_max_length=256)
    edit_json(source / "generation_config.json", max_length=256, max_new_tokens=100)
    edit_json(source / "config.json", max_sequence_length=256)
    output = tmp_path / "out"
    assert run_cli(capfd, monkeypatch, source, "--target", 1024, "--factors", "yarn", "--output", output)[0] == 0

    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.model_max_length == 1024
    assert len(tokenizer(sherlock_text, truncation=True)["input_ids"]) == 1024
    generation = GenerationConfig.from_pretrained(output)
    assert generation.max_length == 1024 and generation.max_new_tokens == 100  # not a window: kept
    assert json.loads((output / "config.json").read_text())["max_sequence_length"] == 1024
    changed = ["- `config.json`: `max_position_embeddings` 256 → 1,024", "- `config.json`: `max_sequence_length` 256 → 1,024",
               "- `generation_config.json`: `max_length` 256 → 1,024",
               "- `tokenizer_config.json`: `model_max_length` 256 → 1,024"]
    assert [line for line in (output / "README.md").read_text().splitlines() if " → " in line] == changed
    refresh_card(output)  # what eval --card does: the list stays
    assert [line for line in (output / "README.md").read_text().splitlines() if " → " in line] == changed
    assert (output / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_console_script_end_to_end(tiny_source, tmp_path):
    script = Path(sys.executable).parent / "longrope-convert"
    help_text = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "Examples:" in help_text and "longrope-convert ./Meta-Llama-3-8B --target 65536" in help_text
    done = subprocess.run([script, tiny_source, "--target", "256", "--factors", "yarn", "--output", tmp_path / "o"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / "o" / "config.json").is_file()
    assert "wrote" in done.stderr and done.stdout == ""
    failed = subprocess.run([script, tmp_path / "nothing", "--target", "256"], capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr == f"error: source '{tmp_path / 'nothing'}' is not a folder\n"


def test_bare_command_shows_usage_and_commands(capfd, monkeypatch):
    """`longrope-convert` alone: its usage and commands on stderr, exit 2, as click >= 8.2 does for a bare group;
    no "error:" (nothing went wrong)."""
    from longrope_convert import cli

    monkeypatch.setattr(sys, "argv", ["longrope-convert"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capfd.readouterr()
    assert exited.value.code == 2 and out == ""
    assert err.startswith("Usage: ") and "longrope-convert [OPTIONS] COMMAND [ARGS]..." in err.splitlines()[0]
    assert "Commands:" in err and "  eval " in err and "error" not in err.lower()
