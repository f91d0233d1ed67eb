"""The converter and its command line: output layout, config, weights, atomicity, bad input."""

import json
import logging
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM

from conftest import TINY_WINDOW, edit_json, tiny_llama_config
from longrope_convert import cli, convert, modeling_longrope_llama
from longrope_convert.card import front_matter
from longrope_convert.factors import ModelFingerprint, analytic_factor_set, load_factor_set
from longrope_convert.modeling_longrope_llama import default_long_mscale
from longrope_convert.source import read_source


def run_cli(capfd, monkeypatch, *args) -> tuple[int, str, str]:
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
        "README.md", "config.json", "generation_config.json", "longrope_factors.json", "model.safetensors",
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
    assert config["longrope"] == {"n_hat": 0, "short_mscale": 1.0, "method": "init:ntk",
                                  "factors_file": "longrope_factors.json"}
    assert config["auto_map"] == {"AutoModel": "modeling_longrope_llama.LongRoPELlamaModel",
                                  "AutoModelForCausalLM": "modeling_longrope_llama.LongRoPELlamaForCausalLM"}
    assert oct(output.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert leftovers(tmp_path) == []


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
    assert "Source card" not in card and "**not searched**: `init:yarn`" in card
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
    output = tmp_path / "out"
    code, out, err = run_cli(capfd, monkeypatch, source, "--target", 128, "--factors", "pi", "--output", output,
                             "--copy-weights", "--json")
    assert code == 0, err
    assert json.loads(out)["weights"]["mode"] == "copy"
    for name in [*shards, "model.safetensors.index.json"]:
        assert (output / name).read_bytes() == (source / name).read_bytes()
        assert os.stat(output / name).st_ino != os.stat(source / name).st_ino
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


def test_shipped_factors_are_found_else_yarn_with_a_warning(tiny_source, tmp_path, capfd, monkeypatch):
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
    assert code == 0 and json.loads(out)["factors"]["method"] == "init:yarn"
    assert "WARNING: no searched factors ship for this model at 512 tokens" in err
    assert load_factor_set(tmp_path / "b" / "longrope_factors.json").method == "init:yarn"


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


def break_source(kind: str, folder: Path, tmp_path: Path) -> list:
    """Damage the tiny source in one way; return extra command-line arguments."""
    config, weights = folder / "config.json", folder / "model.safetensors"
    if kind == "not a folder":
        return ["--source-override", weights]
    if kind == "no config":
        config.unlink()
    elif kind == "not llama":
        edit_json(config, model_type="mistral")
    elif kind == "dynamic scaling":
        edit_json(config, rope_parameters=None, rope_theta=500000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    elif kind == "broken longrope":
        edit_json(config, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [2.0, 1.0] * 4,
                                           "short_factor": [1.0] * 8, "original_max_position_embeddings": 32})
    elif kind == "pickle only":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not loaded")
    elif kind == "no weights":
        weights.unlink()
    elif kind == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[:-100])
    elif kind == "corrupt header":
        data = weights.read_bytes()
        weights.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    elif kind == "missing shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    elif kind == "layer count":
        edit_json(config, num_hidden_layers=3)
    elif kind == "head_dim":
        edit_json(config, head_dim=8)
    elif kind == "small target":
        return ["--target", TINY_WINDOW]
    elif kind == "bad factor file":
        bad = analytic_factor_set("pi", read_source(folder).fingerprint, 256).to_json()
        bad["long_factor"] = bad["long_factor"][:5]
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        return ["--factors", tmp_path / "bad.json"]
    elif kind == "factors for another model":
        other = ModelFingerprint("LlamaForCausalLM", "other", 16, 500000.0, TINY_WINDOW, 2, 64)
        analytic_factor_set("pi", other, 256).save(tmp_path / "other.json")
        return ["--factors", tmp_path / "other.json"]
    elif kind == "factors for another target":
        analytic_factor_set("pi", read_source(folder).fingerprint, 512).save(tmp_path / "512.json")
        return ["--factors", tmp_path / "512.json"]
    elif kind == "unknown method":
        return ["--factors", "linear"]
    elif kind == "missing target":
        return ["--no-target"]
    return []


BAD_INPUTS = {
    "not a folder": "is not a folder",
    "no config": "has no config.json",
    "not llama": "is a 'mistral' model",
    "dynamic scaling": "(rope_scaling): rope_type 'dynamic' (dynamic NTK) changes its frequencies with the sequence",
    "broken longrope": "(rope_scaling): field 'long_factor[1]': must be non-decreasing",
    "pickle only": "has only pickle weights (pytorch_model.bin)",
    "no weights": "has no model.safetensors",
    "truncated weights": "do not fit its size",
    "corrupt header": "corrupt safetensors header",
    "missing shard": "shard 'model-00002-of-00002.safetensors' is missing",
    "layer count": "weights hold 2 decoder layers, config.json says 3",
    "head_dim": "has shape [64, 64], config.json implies [32, 64]",
    "small target": "--target 64 must be larger than the source's context window 64",
    "bad factor file": "bad.json: field 'long_factor': must be a list of head_dim/2 = 8 numbers, got 5",
    "factors for another model": "factors were made for other",
    "factors for another target": "factors are for target 512, not --target 256",
    "unknown method": "linear: no such factor file",
    "missing target": "Missing option '--target'",
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_clear_line_and_leaves_nothing(kind, tiny_source, tmp_path, capfd, monkeypatch):
    extra = break_source(kind, tiny_source, tmp_path)
    source = tiny_source
    args = ["--target", 256]
    if extra[:1] == ["--source-override"]:
        source, extra = extra[1], []
    if extra[:1] == ["--target"] or extra == ["--no-target"]:
        args, extra = extra if extra != ["--no-target"] else [], []
    output = tmp_path / "out"
    code, out, err = run_cli(capfd, monkeypatch, source, *args, *extra, "--output", output)
    lines = err.strip().splitlines()
    assert code != 0 and out == ""
    assert lines[-1].startswith("error: ") and BAD_INPUTS[kind] in lines[-1], err
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err
    assert not output.exists() and leftovers(tmp_path) == []


def test_existing_output_is_refused_and_untouched(tiny_source, tmp_path, capfd, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, out, err = run_cli(capfd, monkeypatch, tiny_source, "--target", 256, "--output", output)
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: output '{output}' already exists; pass --overwrite to replace it")
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []


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
