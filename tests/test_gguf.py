"""GGUF export: the rewritten file (tensors, metadata), composition with a GGUF's own rope_freqs, bad
input, `convert --gguf`, and the result run by llama.cpp itself (llama-cpp-python)."""

import json
import math
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from huggingface_hub import constants
from transformers import AutoTokenizer

from llama_cpp_runtime import baseline_nll, by_context_gguf, llama_cpp_forward, write_llama_gguf
from longrope_convert import gguf as gguf_export
from longrope_convert.convert import default_output, write_checkpoint
from longrope_convert.factors import (
    analytic_factor_set,
    factor_set_from_json,
    llama3_factors,
    load_factor_set,
    yarn_factors,
)
from longrope_convert.perplexity import document_ids, load_longrope_model, perplexity
from longrope_convert.source import read_source
from model_cache import smollm2_gguf
from conftest import edit_json
from test_convert import leftovers, run_cli
from test_hub import env, hub, publish, run  # noqa: F401 (fixtures)

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"  # trained, window 256, head_dim 64
SHIPPED = Path(__file__).parent.parent / "factors"
SMOLLM2_FACTORS = SHIPPED / "SmolLM2-135M-Instruct" / "16384.json"
REWRITTEN_KEYS = {"llama.context_length", "llama.rope.scaling.type", "llama.rope.scaling.attn_factor",
                  "llama.rope.scaling.original_context_length"}


def error_line(err: str) -> str:
    """The one error line a failed command prints (after its status lines)."""
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    return lines[-1]


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: entry.contents() for name, entry in reader.fields.items() if not name.startswith("GGUF.")}


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def llama3_style_gguf(tmp_path_factory) -> Path:
    """The trained testbed as a Llama 3.1-style GGUF: llama3 factors (x2 over its 256 window) in rope_freqs."""
    path = tmp_path_factory.mktemp("llama3") / "tiny-llama3-512.gguf"
    write_llama_gguf(TESTBED, path, context_length=512, rope_freqs=llama3_factors(2.0, 64, 10000.0, 256))
    return path


@pytest.fixture(scope="module")
def plain_gguf(tmp_path_factory) -> Path:
    """The trained testbed as a GGUF without rope_freqs (window 256)."""
    path = tmp_path_factory.mktemp("plain") / "tiny-llama-256.gguf"
    write_llama_gguf(TESTBED, path, context_length=256)
    return path


@pytest.mark.real_model
def test_every_tensor_of_a_quantized_gguf_is_copied_byte_for_byte(tmp_path, capfd, monkeypatch):
    source = smollm2_gguf()
    output = tmp_path / "SmolLM2-16k.gguf"
    code, out, err = run_cli(capfd, monkeypatch, "gguf", source, "--target", 16384, "--output", output, "--json")
    assert code == 0, err
    assert json.loads(out)["factors"]["origin"] == "shipped:SmolLM2-135M-Instruct/16384.json"

    before, after = tensors(source), tensors(output)
    assert set(after) == set(before) | {"rope_freqs.weight"}
    assert {t.tensor_type.name for t in before.values()} == {"Q4_1", "Q8_0", "F32"}
    for name, tensor in before.items():
        copy = after[name]
        assert (copy.tensor_type, copy.shape.tolist()) == (tensor.tensor_type, tensor.shape.tolist())
        assert copy.data_offset % 32 == 0 and copy.data.tobytes() == tensor.data.tobytes(), name
    shipped = load_factor_set(SMOLLM2_FACTORS)
    frequencies = after["rope_freqs.weight"]
    assert frequencies.tensor_type == gguf.GGMLQuantizationType.F32 and frequencies.shape.tolist() == [32]
    assert frequencies.data.tolist() == np.float32(shipped.long_factor).tolist()

    old, new = fields(source), fields(output)
    assert {k: v for k, v in new.items() if k in old and k not in REWRITTEN_KEYS} == \
        {k: v for k, v in old.items() if k not in REWRITTEN_KEYS}
    assert new["llama.context_length"] == 16384 and new["llama.rope.scaling.type"] == "none"
    assert new["llama.rope.scaling.original_context_length"] == 8192
    assert new["llama.rope.scaling.attn_factor"] == pytest.approx(shipped.long_mscale, rel=1e-7)
    assert factor_set_from_json(json.loads(new["longrope.factor_set"])).long_factor == shipped.long_factor
    assert new["longrope.source"] == source.name and new["longrope.tool"].startswith("longrope-convert ")
    assert "no n_hat" in new["longrope.differences"] and "short-window identity" in new["longrope.differences"]
    assert leftovers(tmp_path) == []


def test_analytic_factors_compose_with_the_rope_freqs_a_gguf_already_has(llama3_style_gguf, tmp_path):
    source = gguf_export.inspect_gguf(llama3_style_gguf)
    base = llama3_factors(2.0, 64, 10000.0, 256)
    assert source.base_factors == pytest.approx(base, rel=1e-6) and source.context_length == 512

    factor_set, origin = gguf_export.resolve_gguf_factors(source, "yarn", 2048, status=pytest.fail)
    result = gguf_export.extend_gguf(source, tmp_path / "out.gguf", factor_set, factors_origin=origin)

    # YaRN's 4x is relative to the window the GGUF runs in now (512), on top of its llama3 factors.
    written = tensors(result.output)
    expected = [b * y for b, y in zip(base, yarn_factors(4.0, 64, 10000.0, 512))]
    assert written["rope_freqs.weight"].data.tolist() == pytest.approx(expected, rel=1e-6)
    assert len(written) == len(tensors(llama3_style_gguf))  # replaced, not added twice
    metadata = fields(result.output)
    assert metadata["llama.context_length"] == 2048
    assert metadata["llama.rope.scaling.original_context_length"] == 512
    assert metadata["llama.rope.scaling.attn_factor"] == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-7)
    recorded = json.loads(metadata["longrope.factor_set"])["provenance"]["base_factors"]
    assert recorded["long_factor"] == pytest.approx(base, rel=1e-6)

    # Extending the result again composes once more: its rope_freqs become the base.
    again = gguf_export.inspect_gguf(result.output)
    twice, _ = gguf_export.resolve_gguf_factors(again, "pi", 4096, status=pytest.fail)
    assert twice.long_factor == pytest.approx([2.0 * f for f in expected], rel=1e-6)


def test_analytic_factors_for_a_plain_gguf_are_those_convert_writes_for_its_checkpoint(plain_gguf):
    source = gguf_export.inspect_gguf(plain_gguf)
    assert source.base_factors is None and source.attention_factor == 1.0
    for method in ("pi", "ntk", "yarn", "llama3"):
        factor_set, origin = gguf_export.resolve_gguf_factors(source, method, 1024, status=pytest.fail)
        checkpoint = analytic_factor_set(method, read_source(TESTBED).fingerprint, 1024)
        assert (factor_set.long_factor, factor_set.long_mscale) == (checkpoint.long_factor, checkpoint.long_mscale)
        assert origin == f"init:{method}" and factor_set.model.matches(checkpoint.model)


def test_a_factor_file_made_without_the_gguf_rope_freqs_is_refused(llama3_style_gguf, tmp_path, capfd, monkeypatch):
    factors = tmp_path / "raw.json"
    source = gguf_export.inspect_gguf(llama3_style_gguf)
    analytic_factor_set("ntk", source.fingerprint, 2048).save(factors)  # absolute: ignores the llama3 base
    code, out, err = run_cli(capfd, monkeypatch, "gguf", llama3_style_gguf, "--factors", factors,
                             "--output", tmp_path / "out.gguf")
    assert code == 1 and out == ""
    assert "already scales RoPE per dimension" in error_line(err) and "raw frequencies" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.json"]


def test_a_factor_file_made_on_the_gguf_rope_freqs_is_written_as_it_is(llama3_style_gguf, tmp_path):
    source = gguf_export.inspect_gguf(llama3_style_gguf)
    composed, _ = gguf_export.resolve_gguf_factors(source, "ntk", 1024, status=pytest.fail)
    composed.save(tmp_path / "composed.json")
    factor_set, origin = gguf_export.resolve_gguf_factors(source, str(tmp_path / "composed.json"), None,
                                                          status=pytest.fail)
    output = gguf_export.extend_gguf(source, tmp_path / "out.gguf", factor_set, factors_origin=origin).output
    assert tensors(output)["rope_freqs.weight"].data.tolist() == np.float32(composed.long_factor).tolist()


def test_a_converted_checkpoint_folder_gives_its_factors(plain_gguf, tmp_path, capfd, monkeypatch):
    checkpoint = tmp_path / "tiny-2k"
    source = read_source(TESTBED)
    write_checkpoint(source, load_factor_set(SHIPPED / "tiny-llama-256" / "2048.json"), checkpoint, "shipped")
    code, out, err = run_cli(capfd, monkeypatch, "gguf", plain_gguf, "--factors", checkpoint, "--output",
                             tmp_path / "tiny-2k.gguf", "--json")
    assert code == 0, err
    shipped = load_factor_set(checkpoint / "longrope_factors.json")
    assert tensors(tmp_path / "tiny-2k.gguf")["rope_freqs.weight"].data.tolist() == \
        np.float32(shipped.long_factor).tolist()
    assert json.loads(out)["context_length"] == 2048


def test_convert_with_gguf_extends_the_source_ggufs_into_the_output(plain_gguf, tmp_path, capfd, monkeypatch):
    source = tmp_path / "tiny-llama-256"
    shutil.copytree(TESTBED, source)
    shutil.copyfile(plain_gguf, source / "tiny.F32.gguf")
    code, out, err = run_cli(capfd, monkeypatch, source, "--target", 2048, "--gguf", "*.F32.gguf", "--output",
                             tmp_path / "out", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert [Path(g["output"]).name for g in summary["gguf"]] == ["tiny.F32.gguf"]
    checkpoint = load_factor_set(tmp_path / "out" / "longrope_factors.json")
    assert checkpoint.method == "search"  # the shipped factors of the testbed at 2048
    assert tensors(tmp_path / "out" / "tiny.F32.gguf")["rope_freqs.weight"].data.tolist() == \
        np.float32(checkpoint.long_factor).tolist()

    code, _, err = run_cli(capfd, monkeypatch, source, "--target", 2048, "--gguf", "*.Q4_0.gguf", "--output",
                           tmp_path / "none")
    assert code == 1 and "no GGUF file" in error_line(err) and not (tmp_path / "none").exists()


def test_convert_with_gguf_on_a_llama3_source_writes_what_the_gguf_command_writes(llama3_style_gguf, tmp_path,
                                                                                  capfd, monkeypatch):
    """A Llama 3.1-style checkpoint (llama3 scaling in config.json) and its GGUF (the same factors in
    rope_freqs): `convert --gguf` and `gguf` on the GGUF alone compose the same long set on the same base."""
    source = tmp_path / "tiny-llama3"
    shutil.copytree(TESTBED, source)
    edit_json(source / "config.json", max_position_embeddings=512, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256})
    shutil.copyfile(llama3_style_gguf, source / "tiny-llama3.F32.gguf")
    code, out, err = run_cli(capfd, monkeypatch, source, "--target", 2048, "--factors", "yarn", "--gguf", "*.gguf",
                             "--output", tmp_path / "out", "--json")
    assert code == 0, err
    checkpoint = load_factor_set(tmp_path / "out" / "longrope_factors.json")
    written = tmp_path / "out" / "tiny-llama3.F32.gguf"
    assert tensors(written)["rope_freqs.weight"].data.tolist() == np.float32(checkpoint.long_factor).tolist()
    assert fields(written)["llama.rope.scaling.attn_factor"] == pytest.approx(checkpoint.long_mscale, rel=1e-6)

    code, _, err = run_cli(capfd, monkeypatch, "gguf", llama3_style_gguf, "--factors", "yarn", "--target", 2048,
                           "--output", tmp_path / "alone.gguf")
    assert code == 0, err
    assert tensors(tmp_path / "alone.gguf")["rope_freqs.weight"].data.tolist() == \
        pytest.approx(tensors(written)["rope_freqs.weight"].data.tolist(), rel=1e-6)
    assert fields(tmp_path / "alone.gguf")["llama.rope.scaling.attn_factor"] == \
        pytest.approx(fields(written)["llama.rope.scaling.attn_factor"], rel=1e-6)


def test_convert_with_gguf_downloads_only_the_matching_ggufs_from_the_hub(hub, env, plain_gguf, tmp_path):
    publish(hub, "org/tiny-gguf", TESTBED, {"tiny.F32.gguf": plain_gguf.read_bytes(),
                                              "tiny.Q8_0.gguf": b"another quantization, never fetched"})
    done = run(env, "org/tiny-gguf", "--target", 2048, "--gguf", "*.F32.gguf", "--output", tmp_path / "out",
               "--push-to", "me/tiny-gguf-2k")
    assert done.returncode == 0, done.stderr
    gets = [r["path"] for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert any(path.endswith("tiny.F32.gguf") for path in gets) and not any("Q8_0" in path for path in gets)
    pushed = hub.store.load("me/tiny-gguf-2k")
    assert "tiny.F32.gguf" in pushed["commits"][pushed["branches"]["main"]]["files"]
    assert fields(tmp_path / "out" / "tiny.F32.gguf")["llama.context_length"] == 2048


def _gguf_with(path: Path, **metadata) -> Path:
    """A copy of a GGUF with some metadata replaced (value None: removed), through gguf's own writer."""
    reader = gguf.GGUFReader(path)
    target = path.with_name(f"edited-{len(metadata)}-{'-'.join(metadata)}.gguf")
    writer = gguf.GGUFWriter(target, metadata.pop("arch", "llama"))
    for name, entry in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value, kind = entry.contents(), entry.types[0]
        if name in metadata:
            value = metadata.pop(name)
        if value is not None:
            writer.add_key_value(name, value, kind, sub_type=entry.types[-1] if len(entry.types) > 1 else None)
    for name, value in metadata.items():
        writer.add_key_value(name, value, gguf.GGUFValueType.get_type(value))
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.mark.parametrize("case, message", [
    ("text", "not a readable GGUF file"),
    ("truncated", "or a truncated one (cannot reshape"),
    ("qwen2", "is a 'qwen2' model"),
    ("yarn", "already scales RoPE with llama.cpp's 'yarn' type"),
    ("split", "split GGUF"),
    ("head_dim", "factors were made for another model (tiny-llama-256): head_dim 64 (this GGUF: 32)"),
    ("short target", "--target 256 must be larger than the GGUF's context length 512"),
    ("no target", "--factors yarn needs --target"),
])
def test_bad_input_gets_one_line_and_nothing_is_written(case, message, llama3_style_gguf, plain_gguf, tmp_path,
                                                        capfd, monkeypatch):
    source, extra = plain_gguf, ["--factors", "yarn", "--target", "2048"]
    if case == "text":
        source = tmp_path / "notes.gguf"
        source.write_text("not a gguf file at all\n")
    elif case == "truncated":
        source = tmp_path / "cut.gguf"
        source.write_bytes(plain_gguf.read_bytes()[:-1000])
    elif case == "qwen2":
        source = _gguf_with(plain_gguf, arch="qwen2", **{"qwen2.context_length": 256})
    elif case == "yarn":
        source = _gguf_with(plain_gguf, **{"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    elif case == "split":
        source = _gguf_with(plain_gguf, **{"split.count": 3, "split.no": 0})
    elif case == "head_dim":
        source = _gguf_with(plain_gguf, **{"llama.attention.key_length": 32, "llama.attention.value_length": 32,
                                           "llama.rope.dimension_count": 32})
        extra = ["--factors", str(SHIPPED / "tiny-llama-256" / "2048.json")]
    elif case == "short target":
        source, extra = llama3_style_gguf, ["--factors", "pi", "--target", "256"]
    elif case == "no target":
        extra = ["--factors", "yarn"]
    output = tmp_path / "out" / "extended.gguf"
    output.parent.mkdir()
    code, out, err = run_cli(capfd, monkeypatch, "gguf", source, *extra, "--output", output)
    assert (code, out) == (1, "") and message in error_line(err)
    assert list(output.parent.iterdir()) == []


def test_an_existing_output_is_kept_unless_overwrite(plain_gguf, tmp_path, capfd, monkeypatch):
    output = tmp_path / "extended.gguf"
    output.write_text("mine")
    arguments = ["gguf", plain_gguf, "--factors", "yarn", "--target", 1024, "--output", output]
    code, _, err = run_cli(capfd, monkeypatch, *arguments)
    assert code == 1 and "already exists" in error_line(err) and output.read_text() == "mine"
    assert run_cli(capfd, monkeypatch, *arguments, "--overwrite")[0] == 0
    assert fields(output)["llama.context_length"] == 1024 and leftovers(tmp_path) == []
    (tmp_path / "folder").mkdir()
    code, _, err = run_cli(capfd, monkeypatch, *arguments[:-1], tmp_path / "folder", "--overwrite")
    assert code == 1 and "is a folder; give a file name" in error_line(err) and leftovers(tmp_path) == []


def test_an_extended_gguf_extended_again_gets_a_clean_default_name(plain_gguf, tmp_path, capfd, monkeypatch):
    """X-longrope-512.gguf extended to 1024 becomes X-longrope-1k.gguf, not X-longrope-512-longrope-1k.gguf; the
    same rule names a re-converted checkpoint folder."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(plain_gguf, tmp_path / plain_gguf.name)
    assert run_cli(capfd, monkeypatch, "gguf", plain_gguf.name, "--factors", "yarn", "--target", 512)[0] == 0
    first = tmp_path / "tiny-llama-256-longrope-512.gguf"
    assert fields(first)["llama.context_length"] == 512
    assert run_cli(capfd, monkeypatch, "gguf", first.name, "--factors", "yarn", "--target", 1024)[0] == 0
    assert fields(tmp_path / "tiny-llama-256-longrope-1k.gguf")["llama.context_length"] == 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny-llama-256-longrope-1k.gguf", "tiny-llama-256-longrope-512.gguf", "tiny-llama-256.gguf"]
    assert default_output("org/SmolLM2-longrope-16k", 32768) == Path("SmolLM2-longrope-32k")
    assert default_output("my-longrope-model", 32768) == Path("my-longrope-model-longrope-32k")


def test_the_output_is_checked_as_every_output_is(plain_gguf, tmp_path, capfd, monkeypatch):
    """outputs.check_output_file: never the source GGUF (even through a link), never inside the HF cache."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    source = tmp_path / plain_gguf.name
    shutil.copy(plain_gguf, source)
    (tmp_path / "link.gguf").symlink_to(source)
    for output, message in ((source, "is the source GGUF"), (tmp_path / "link.gguf", "is the source GGUF"),
                            (tmp_path / "hf-cache" / "x.gguf", "lies inside the Hugging Face cache")):
        code, _, err = run_cli(capfd, monkeypatch, "gguf", source, "--factors", "yarn", "--target", 1024,
                               "--output", output, "--overwrite")
        assert code == 1 and message in error_line(err)
    assert source.read_bytes() == plain_gguf.read_bytes() and not (tmp_path / "hf-cache").exists()


def test_the_next_run_removes_what_a_killed_export_left(plain_gguf, tmp_path):
    """A GGUF export killed half-way leaves its staging file; the next export next to it removes it."""
    output = tmp_path / "extended.gguf"
    killed = subprocess.run([sys.executable, "-c", """if True:
        import os, signal, sys
        from longrope_convert import cli, gguf

        def write_half_and_die(source, factor_set, factors_origin, path):
            path.write_bytes(b"half a GGUF")
            os.kill(os.getpid(), signal.SIGKILL)

        gguf._write_extended = write_half_and_die
        sys.argv = ["longrope-convert", "gguf", *sys.argv[1:]]
        cli.main()
        """, plain_gguf, "--factors", "yarn", "--target", "1024", "--output", output], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name.startswith(".extended.gguf.partial-") for p in tmp_path.iterdir()] == [True]

    source = gguf_export.inspect_gguf(plain_gguf)
    factor_set, origin = gguf_export.resolve_gguf_factors(source, "yarn", 1024, status=pytest.fail)
    gguf_export.extend_gguf(source, output, factor_set, factors_origin=origin)
    assert [p.name for p in tmp_path.iterdir()] == [output.name] and fields(output)["llama.context_length"] == 1024


# llama.cpp itself -----------------------------------------------------------------------------------

def longrope_reference(folder: Path, factor_set, original_window: int):
    """Our transformers model with `factor_set`'s long set (inputs here are longer than `original_window`)."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=factor_set.model.rope_theta, max_position_embeddings=factor_set.target_length,
                  rope_scaling={"rope_type": "longrope", "long_factor": factor_set.long_factor,
                                "short_factor": factor_set.short_factor,
                                "original_max_position_embeddings": original_window,
                                "factor": factor_set.target_length / original_window,
                                "attention_factor": factor_set.long_mscale},
                  longrope={"n_hat": factor_set.n_hat, "short_mscale": factor_set.short_mscale})
    return load_longrope_model(folder, config)


@pytest.mark.llama_cpp
@torch.inference_mode()
def test_llama_cpp_runs_a_llama3_style_gguf_extended_with_yarn_as_the_composed_long_set(llama3_style_gguf,
                                                                                         sherlock_text, tmp_path):
    """F32 weights: llama.cpp and transformers differ by kernels only (F16 K/V cache; max |logit diff|
    measured 0.013 on logits up to ~15). Without the attention factor the difference is 3.8, with the
    llama3 base alone 11.4: the tolerance of 0.05 tells them apart."""
    source = gguf_export.inspect_gguf(llama3_style_gguf)
    factor_set, origin = gguf_export.resolve_gguf_factors(source, "yarn", 2048, status=pytest.fail)
    extended = gguf_export.extend_gguf(source, tmp_path / "tiny-2k.gguf", factor_set, factors_origin=origin).output
    ids = document_ids(AutoTokenizer.from_pretrained(TESTBED), sherlock_text, 2048)
    expected = longrope_reference(TESTBED, factor_set, 512)(ids).logits[0].numpy()
    _, logits = llama_cpp_forward(extended, ids[0].tolist(), logits_at=range(2048))
    assert np.abs(logits - expected).max() <= 0.05
    without_attention_factor = longrope_reference(TESTBED, replace(factor_set, long_mscale=1.0), 512)(ids).logits[0]
    assert np.abs(logits - without_attention_factor.numpy()).max() > 1.0


@pytest.mark.llama_cpp
@torch.inference_mode()
def test_llama_cpp_picks_longrope_factor_sets_for_a_llama_by_the_allocated_context(plain_gguf, sherlock_text, tmp_path):
    """Why `gguf` writes rope_freqs and not llama.cpp's `longrope` type (longrope_convert/gguf.py): llama.cpp reads
    that type for a Llama correctly, as src/llama-model.cpp:2337-2350 says (llama.cpp 0c1e57098): the short set when
    the context (`-c`, padded to 256) is at most the original window, else the long set, for every position; the
    attention factor for both. Measured: max |logit diff| 0.004 and 0.008 against the set expected, 3.2 against the
    other one. What it gives a real model is in BENCHMARKS.md (llama.cpp by context size)."""
    factor_set = load_factor_set(SHIPPED / "tiny-llama-256" / "2048.json")
    assert factor_set.n_hat == 0  # llama.cpp has none
    source = gguf_export.inspect_gguf(plain_gguf)
    export = gguf_export.extend_gguf(source, tmp_path / "export.gguf", factor_set, factors_origin="shipped").output
    output = tmp_path / "longrope-type.gguf"
    by_context_gguf(export, factor_set.long_factor, factor_set.short_factor, output)
    assert fields(output)["llama.rope.scaling.type"] == "longrope" and "rope_freqs.weight" not in tensors(output)

    ids = document_ids(AutoTokenizer.from_pretrained(TESTBED), sherlock_text, 256)
    # our model with one set at every position (a window below the input), the attention factor for both
    expected = {"short": longrope_reference(TESTBED, replace(factor_set, long_factor=factor_set.short_factor), 16),
                "long": longrope_reference(TESTBED, factor_set, 16)}
    expected = {name: model(ids).logits[0].numpy() for name, model in expected.items()}
    for n_ctx, used, other in ((256, "short", "long"), (512, "long", "short"), (2048, "long", "short")):
        _, logits = llama_cpp_forward(output, ids[0].tolist(), logits_at=range(256), n_ctx=n_ctx)
        assert np.abs(logits - expected[used]).max() <= 0.05, n_ctx
        assert np.abs(logits - expected[other]).max() > 1.0, n_ctx


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(reference || other) per row of logits, in nats."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    log_p = log_softmax(reference)
    return (np.exp(log_p) * (log_p - log_softmax(other))).sum(axis=1)


@pytest.mark.real_model
@pytest.mark.llama_cpp
@torch.inference_mode()
def test_llama_cpp_runs_smollm2_extended_to_16k(smollm2_dir, sherlock_text, tmp_path):
    """SmolLM2-135M Q4_1 with the shipped searched 16k factors, run by llama.cpp on a book the search
    never saw. Its logits beyond 8,192 are compared with our transformers model on the same weights
    de-quantised (smollm2_dir is this GGUF de-quantised), so what differs is llama.cpp's kernels: 8-bit
    activations in the quantized matmuls and the F16 K/V cache. Measured at positions 8192..8447: mean
    KL 0.0035 nats, top-1 agreement 96 %; the unscaled GGUF there: mean KL 0.038."""
    source = gguf_export.inspect_gguf(smollm2_gguf())
    factor_set = load_factor_set(SMOLLM2_FACTORS)
    extended = gguf_export.extend_gguf(source, tmp_path / "smollm2-16k.gguf", factor_set,
                                       factors_origin="shipped").output
    ids = document_ids(AutoTokenizer.from_pretrained(smollm2_dir), sherlock_text, 16384)[0].tolist()
    compared = range(8192, 8192 + 256)
    nll, logits = llama_cpp_forward(extended, ids, logits_at=compared)

    reference = longrope_reference(smollm2_dir, factor_set, 8192)
    hidden = reference.model(input_ids=torch.tensor([ids[:compared.stop]]), use_cache=False).last_hidden_state
    expected = reference.lm_head(hidden[0, compared.start:]).numpy()
    agreement = kl_divergence(expected, logits)
    at_8k, at_16k = perplexity(torch.tensor(nll[:8191])), perplexity(torch.tensor(nll))
    unscaled = torch.tensor(baseline_nll(source.path, ids))
    unscaled_at_16k = perplexity(unscaled)
    print(f"llama.cpp SmolLM2 16k: KL vs transformers {agreement.mean():.4f}, top-1 "
          f"{np.mean(expected.argmax(1) == logits.argmax(1)):.3f}; ppl 8k {at_8k:.3f}, 16k {at_16k:.3f}; unscaled "
          f"GGUF: 8k {perplexity(unscaled[:8191]):.3f}, 16k {unscaled_at_16k:.3f}")
    assert agreement.mean() <= 0.01
    assert at_16k <= 1.25 * at_8k
    assert at_16k * 1.5 <= unscaled_at_16k
