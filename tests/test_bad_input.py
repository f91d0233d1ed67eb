"""Every command, every kind of bad input: one line on stderr, a non-zero exit, no traceback, nothing
written (no output, no log, no staging folder, nothing downloaded).

The cases are the table CASES below: (command, kind of bad input, the case, what the error line says).
Commands run through the real CLI: in this process (cli.main) where they can, as a subprocess where
the case needs one (a process without the right to write, a file size limit, the Hub's endpoint).
"""

import ctypes
import errno
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from conftest import TINY_WINDOW, edit_json
from hub_server import HubServer
from longrope_convert import cli
from longrope_convert.convert import write_checkpoint
from longrope_convert.factors import ModelFingerprint, analytic_factor_set
from longrope_convert.outputs import MARKER, marker_text
from longrope_convert.source import read_source

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"
TEXT = Path(__file__).parent / "data" / "sherlock_holmes_excerpt.txt"
HF_CACHE = Path("hf-cache")  # under each test's tmp_path

CASES = [
    # convert, on a random 2-layer Llama (window 64, output head not tied)
    ("convert", "missing files", "source is not a folder", "is not a folder"),
    ("convert", "missing files", "no config.json", "has no config.json"),
    ("convert", "missing files", "no weights", "has no model.safetensors"),
    ("convert", "missing files", "pickle weights only", "has only pickle weights (pytorch_model.bin)"),
    ("convert", "missing files", "a shard missing", "shard 'model-00002-of-00002.safetensors' is missing"),
    ("convert", "missing files", "no output head, not tied", "no tensor 'lm_head.weight', and config.json does not tie"),
    ("convert", "missing files", "a layer's norm missing", "no tensor 'model.layers.1.post_attention_layernorm.weight'"),
    ("convert", "missing files", "no such factor file", "linear: no such factor file"),
    ("convert", "corrupt files", "config.json not JSON", "config.json: not a readable JSON file"),
    ("convert", "corrupt files", "weights truncated", "do not fit its size"),
    ("convert", "corrupt files", "safetensors header corrupt", "corrupt safetensors header"),
    ("convert", "corrupt files", "tokenizer_config.json not JSON", "tokenizer_config.json: not a readable JSON file"),
    ("convert", "corrupt files", "factor file of the wrong size", "bad.json: field 'long_factor': must be a list of "
                                                                   "head_dim/2 = 8 numbers, got 5"),
    ("convert", "corrupt files", "LongRoPE config not monotone", "(rope_scaling): field 'long_factor[1]': must be "
                                                                 "non-decreasing"),
    ("convert", "wrong types", "not a Llama", "is a 'mistral' model"),
    ("convert", "wrong types", "GPTQ weights", "is quantized (quant_method 'gptq'); longrope-convert converts "
                                               "unquantized checkpoints"),
    ("convert", "wrong types", "bitsandbytes weights", "is quantized (quant_method 'bitsandbytes')"),
    ("convert", "wrong types", "FP8 weights of the right shapes", "is quantized (quant_method 'fp8')"),
    ("convert", "wrong types", "dynamic NTK scaling", "(rope_scaling): rope_type 'dynamic' (dynamic NTK) changes its "
     "frequencies with the sequence length"),
    ("convert", "wrong types", "hidden_size a string", "'hidden_size' must be a positive integer, got '64'"),
    ("convert", "wrong types", "tie_word_embeddings a string", "'tie_word_embeddings' must be true or false"),
    ("convert", "wrong types", "vocab_size not the weights'", "'model.embed_tokens.weight' has shape [256, 64], "
                                                              "config.json implies [300, 64]"),
    ("convert", "wrong types", "layer count not the weights'", "weights hold 2 decoder layers, config.json says 3"),
    ("convert", "wrong types", "head_dim not the weights'", "has shape [64, 64], config.json implies [32, 64]"),
    ("convert", "wrong types", "factors for another model", "factors were made for other"),
    ("convert", "impossible lengths", "target within the window", "--target 64 must be larger than the source's "
                                                                  "context window 64"),
    ("convert", "impossible lengths", "target zero", "Invalid value for '--target': 0 is not in the range x>=1"),
    ("convert", "impossible lengths", "target beyond float32 positions", "--target 16777217 is beyond 16,777,216 "
                                                                         "tokens, where float32 positions"),
    ("convert", "impossible lengths", "no target", "Missing option '--target'"),
    ("convert", "impossible lengths", "window zero", "'max_position_embeddings' must be a positive integer, got 0"),
    ("convert", "impossible lengths", "factors for another target", "factors are for target 512, not --target 256"),
    ("convert", "unwritable places", "output is the source", "is the source"),
    ("convert", "unwritable places", "output inside the source", "lies inside the source"),
    ("convert", "unwritable places", "output inside the Hugging Face cache", "lies inside the Hugging Face cache"),
    ("convert", "unwritable places", "output holds the source, --overwrite", "contains the source"),
    ("convert", "unwritable places", "output holds a linked weight file", "contains a file of the source"),
    ("convert", "unwritable places", "output not written by this tool", "was not written by longrope-convert"),
    ("convert", "unwritable places", "output exists", "already exists; pass --overwrite"),
    ("convert", "unwritable places", "a conversion holding the user's files, --overwrite",
     "holds files longrope-convert did not write (notes.txt, sub/config.json); --overwrite replaces the whole"),
    ("convert", "unwritable places", "output is a file", "exists and is not a folder"),
    ("convert", "unwritable places", "output under a file", "is a file, not a folder"),
    ("convert", "unwritable places", "output name too long", "the name is longer than the file system's"),
    ("convert", "unwritable places", "output in a read-only folder", "permission denied"),
    ("convert", "unwritable places", "file size limit while copying", "the file is too large"),
    ("convert", "unwritable places", "output is a mount point, --overwrite", "in use by another process or a mount"),
    # search, on the trained testbed (window 256)
    ("search", "missing files", "no tokenizer", "has no tokenizer (tokenizer.json"),
    ("search", "missing files", "data not there", "data './books': no such file or folder"),
    ("search", "missing files", "data folder without text", "has no .txt or .jsonl files"),
    ("search", "corrupt files", "tokenizer.json not JSON", "tokenizer.json: not a readable JSON file"),
    ("search", "corrupt files", "JSONL line not an object", "not a JSON object with a 'text' field"),
    ("search", "corrupt files", "weights truncated", "do not fit its size"),
    ("search", "wrong types", "--short on a plain model", "--short searches the short factors of a LongRoPE"),
    ("search", "impossible lengths", "target within the window", "--target 256 must be larger"),
    ("search", "wrong types", "--max-evals infinite", "Invalid value for '--max-evals': must be a finite number"),
    ("search", "impossible lengths", "documents shorter than the target", "--data has no document of at least "
                                                                          "65536 tokens"),
    ("search", "unwritable places", "--out is a folder", "--out '"),
    ("search", "unwritable places", "--convert-to exists", "already exists; give a new folder"),
    ("search", "unwritable places", "--convert-to inside the source", "lies inside the source"),
    ("search", "unwritable places", "--convert-to inside the Hugging Face cache",
     "converted' lies inside the Hugging Face cache"),
    ("search", "unwritable places", "--out inside the source", "factors.json' lies inside the source"),
    ("search", "unwritable places", "--log inside the source", "search.log.jsonl' lies inside the source"),
    ("search", "unwritable places", "log exists", "exists; pass --resume"),
    ("search", "unwritable places", "--out in a read-only folder", "permission denied"),
    # eval, on the testbed converted to 1024
    ("eval", "missing files", "not a LongRoPE checkpoint", "is not a LongRoPE checkpoint"),
    ("eval", "missing files", "no tokenizer", "has no tokenizer (tokenizer.json"),
    ("eval", "missing files", "data not there", "data './books': no such file or folder"),
    ("eval", "corrupt files", "config.json not JSON", "config.json: not a readable JSON file"),
    ("eval", "corrupt files", "weights truncated", "do not fit its size"),
    ("eval", "impossible lengths", "documents shorter than the length", "--data has no document of at least"),
    ("eval", "wrong types", "--stride without the sliding protocol", "--stride applies to --protocol sliding"),
    ("eval", "unwritable places", "--out is the checkpoint", "is the checkpoint"),
    ("eval", "unwritable places", "--out not written by this tool", "was not written by longrope-convert"),
    ("eval", "unwritable places", "--out in a read-only folder", "permission denied"),
    # convert --push-to, against tests/hub_server.py
    ("push", "wrong types", "repo id not valid", "is not a valid repo id"),
    ("push", "missing files", "no login", "needs a login: run `hf auth login` or set HF_TOKEN"),
    ("push", "missing files", "Hub source without output head", "no tensor 'lm_head.weight'"),
    ("push", "corrupt files", "Hub source with truncated weights", "do not fit its size"),
    ("push", "offline", "HF_HUB_OFFLINE set", "HF_HUB_OFFLINE is set: pushing to 'me/pushed' needs http"),
]


def arrange(command: str, case: str, tmp_path: Path, tiny_llama_dir: Path, converted: Path) -> tuple[list, str]:
    """Make the bad input of a case of `command` in tmp_path; return the command line and how to run it:
    "here", "unprivileged", "file size limit" or "mount point"."""
    out = tmp_path / "out"
    tiny = tmp_path / "tiny-llama"
    if command == "convert":
        shutil.copytree(tiny_llama_dir, tiny)
        args, how = [tiny, "--target", 256, "--output", out], "here"
    elif command == "search":
        shutil.copytree(TESTBED, tmp_path / "testbed")
        args, how = ["search", tmp_path / "testbed", "--target", 1024, "--data", TEXT, "--documents", 1,
                     "--max-evals", 1, "--no-baselines", "--out", tmp_path / "factors.json"], "here"
    else:
        shutil.copytree(converted, tmp_path / "checkpoint")
        args, how = ["eval", tmp_path / "checkpoint", "--lengths", 512, "--data", TEXT], "here"
    config, weights = tiny / "config.json", tiny / "model.safetensors"
    readonly = tmp_path / "readonly"

    if case == "source is not a folder":
        args[0] = weights
    elif case == "no config.json":
        config.unlink()
    elif case == "no weights":
        weights.unlink()
    elif case == "pickle weights only":
        weights.unlink()
        (tiny / "pytorch_model.bin").write_bytes(b"PK\x03\x04 never loaded")
    elif case == "a shard missing":
        (tiny / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    elif case == "no output head, not tied":
        drop_tensor(weights, "lm_head.weight")
    elif case == "a layer's norm missing":
        drop_tensor(weights, "model.layers.1.post_attention_layernorm.weight")
    elif case == "no such factor file":
        args += ["--factors", "linear"]
    elif case in ("config.json not JSON", "weights truncated", "safetensors header corrupt",
                  "tokenizer_config.json not JSON"):
        folder = {"convert": tiny, "search": tmp_path / "testbed", "eval": tmp_path / "checkpoint"}[command]
        if case == "config.json not JSON":
            (folder / "config.json").write_text('{"model_type": "llama",')
        elif case == "tokenizer_config.json not JSON":
            (folder / "tokenizer_config.json").write_text("{not json")
        else:
            data = (folder / "model.safetensors").read_bytes()
            damaged = data[:-100] if case == "weights truncated" else (2**40).to_bytes(8, "little") + data[8:]
            (folder / "model.safetensors").unlink()  # a copy may share its file with the testbed
            (folder / "model.safetensors").write_bytes(damaged)
    elif case == "factor file of the wrong size":
        bad = analytic_factor_set("pi", read_source(tiny).fingerprint, 256).to_json()
        bad["long_factor"] = bad["long_factor"][:5]
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        args += ["--factors", tmp_path / "bad.json"]
    elif case == "LongRoPE config not monotone":
        edit_json(config, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [2.0, 1.0] * 4,
                                           "short_factor": [1.0] * 8, "original_max_position_embeddings": 32})
    elif case == "not a Llama":
        edit_json(config, model_type="mistral")
    elif case == "GPTQ weights":  # GPTQ packs each projection into qweight/qzeros/scales of other shapes
        edit_json(config, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
        tensors = load_file(weights)
        weight = tensors.pop("model.layers.0.self_attn.q_proj.weight")
        tensors["model.layers.0.self_attn.q_proj.qweight"] = weight[: weight.shape[0] // 8].to(torch.int32)
        weights.unlink()
        save_file(tensors, weights, metadata={"format": "pt"})
    elif case == "bitsandbytes weights":
        edit_json(config, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True,
                                               "bnb_4bit_quant_type": "nf4"})
    elif case == "FP8 weights of the right shapes":  # as a fine-grained FP8 checkpoint: shapes match the config
        edit_json(config, quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic",
                                               "weight_block_size": [128, 128]})
        tensors = {name: tensor.to(torch.float8_e4m3fn) if name.endswith("proj.weight") else tensor
                   for name, tensor in load_file(weights).items()}
        weights.unlink()
        save_file(tensors, weights, metadata={"format": "pt"})
    elif case == "dynamic NTK scaling":
        edit_json(config, rope_parameters=None, rope_theta=500000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    elif case == "hidden_size a string":
        edit_json(config, hidden_size="64")
    elif case == "tie_word_embeddings a string":
        edit_json(config, tie_word_embeddings="no")
    elif case == "vocab_size not the weights'":
        edit_json(config, vocab_size=300)
    elif case == "layer count not the weights'":
        edit_json(config, num_hidden_layers=3)
    elif case == "head_dim not the weights'":
        edit_json(config, head_dim=8)
    elif case == "factors for another model":
        other = ModelFingerprint("LlamaForCausalLM", "other", 16, 500000.0, TINY_WINDOW, 2, 64)
        analytic_factor_set("pi", other, 256).save(tmp_path / "other.json")
        args += ["--factors", tmp_path / "other.json"]
    elif case == "factors for another target":
        analytic_factor_set("pi", read_source(tiny).fingerprint, 512).save(tmp_path / "512.json")
        args += ["--factors", tmp_path / "512.json"]
    elif case == "target within the window":
        args[args.index("--target") + 1] = TINY_WINDOW if command == "convert" else 256
    elif case == "target zero":
        args[args.index("--target") + 1] = 0
    elif case == "--stride without the sliding protocol":
        args += ["--stride", 128]
    elif case == "--max-evals infinite":
        args[args.index("--max-evals") + 1] = "inf"
    elif case == "target beyond float32 positions":
        args[args.index("--target") + 1] = 2**24 + 1
    elif case == "no target":
        del args[1:3]
    elif case == "window zero":
        edit_json(config, max_position_embeddings=0)
    elif case == "output is the source":
        args[-1] = tiny
    elif case == "output inside the source":
        args[-1] = tiny / "longrope"
    elif case in ("output inside the Hugging Face cache", "--convert-to inside the Hugging Face cache"):
        inside = HF_CACHE / "models--org--tiny" / "converted"  # the test's HF_HUB_CACHE: see the test below
        args += ["--convert-to", inside] if command == "search" else []
        args[-1] = tmp_path / inside
    elif case == "output holds the source, --overwrite":  # the data-loss report: --output models --overwrite
        args[-1] = tmp_path
        args.append("--overwrite")
    elif case == "output holds a linked weight file":
        blobs = tmp_path / "blobs"
        blobs.mkdir()
        os.replace(weights, blobs / "0a1b2c")
        weights.symlink_to(blobs / "0a1b2c")
        (blobs / MARKER).write_text(marker_text())
        args[-1] = blobs
        args.append("--overwrite")
    elif case == "output not written by this tool":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        args.append("--overwrite")
    elif case == "output exists":
        out.mkdir()
        (out / MARKER).write_text(marker_text())
    elif case == "a conversion holding the user's files, --overwrite":
        (out / "sub").mkdir(parents=True)
        for folder in (out, out / "sub"):
            (folder / MARKER).write_text(marker_text())
            (folder / "config.json").write_text("{}")
        (out / "notes.txt").write_text("mine")
        args.append("--overwrite")
    elif case == "output is a file":
        out.write_text("a file")
    elif case == "output under a file":
        out.write_text("a file")
        args[-1] = out / "converted"
    elif case == "output name too long":
        args[-1] = tmp_path / ("x" * 300)
    elif case in ("output in a read-only folder", "--out in a read-only folder"):
        readonly.mkdir(mode=0o555)
        how = "unprivileged"
        if command == "eval":
            args += ["--out", readonly / "results"]
        else:
            args[-1] = readonly / ("out" if command == "convert" else "factors.json")
    elif case == "file size limit while copying":
        args[0] = tmp_path / "testbed"
        shutil.copytree(TESTBED, tmp_path / "testbed")
        args[args.index("--target") + 1] = 1024
        args.append("--copy-weights")
        how = "file size limit"
    elif case == "output is a mount point, --overwrite":  # found only when it is moved aside, at the end
        out.mkdir()
        (out / MARKER).write_text(marker_text())
        args.append("--overwrite")
        how = "mount point"
    elif case == "no tokenizer":
        folder = tmp_path / ("testbed" if command == "search" else "checkpoint")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    elif case == "tokenizer.json not JSON":
        (tmp_path / "testbed" / "tokenizer.json").write_text("{")
    elif case == "data not there":
        args[args.index("--data") + 1] = "./books"
    elif case == "data folder without text":
        (tmp_path / "books").mkdir()
        (tmp_path / "books" / "cover.png").write_bytes(b"\x89PNG")
        args[args.index("--data") + 1] = tmp_path / "books"
    elif case == "JSONL line not an object":
        (tmp_path / "books.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
        args[args.index("--data") + 1] = tmp_path / "books.jsonl"
    elif case == "--short on a plain model":
        del args[2:4]
        args.insert(2, "--short")
    elif case == "documents shorter than the target":
        args[args.index("--target") + 1] = 65536
    elif case == "--out is a folder":
        (tmp_path / "factors.json").mkdir()
    elif case == "--convert-to exists":
        out.mkdir()
        args += ["--convert-to", out]
    elif case == "--convert-to inside the source":
        args += ["--convert-to", tmp_path / "testbed" / "converted"]
    elif case == "--out inside the source":
        args[args.index("--out") + 1] = tmp_path / "testbed" / "factors.json"
    elif case == "--log inside the source":
        args += ["--log", tmp_path / "testbed" / "search.log.jsonl"]
    elif case == "log exists":
        (tmp_path / "factors.json.log.jsonl").write_text("{}\n")
    elif case == "not a LongRoPE checkpoint":
        shutil.rmtree(tmp_path / "checkpoint")
        shutil.copytree(TESTBED, tmp_path / "checkpoint")
    elif case == "documents shorter than the length":
        args[args.index("--lengths") + 1] = 60000
        args.append("--beyond-target")  # past the length check: no document is that long
    elif case == "--out is the checkpoint":
        args += ["--out", tmp_path / "checkpoint"]
    elif case == "--out not written by this tool":
        (tmp_path / "results").mkdir()
        (tmp_path / "results" / "notes.txt").write_text("mine")
        args += ["--out", tmp_path / "results"]
    return args, how


def drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(path)
    del tensors[name]
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def unprivileged() -> None:
    """In the child: drop the capabilities that let root write anywhere (no-op for other users)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the exec'd program
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def file_size_limit() -> None:
    """In the child: writing past 1 MB fails with EFBIG, as a full disk fails with ENOSPC."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("converted") / "testbed-longrope-1k"
    source = read_source(TESTBED)
    write_checkpoint(source, analytic_factor_set("yarn", source.fingerprint, 1024), folder, "init:yarn")
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub")).start()
    yield server
    server.shutdown()


LOCAL_CASES = [case for case in CASES if case[0] != "push"]
PUSH_CASES = [case for case in CASES if case[0] == "push"]


def one_line(code: int, out: str, err: str, expected: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and out == "" and "Traceback" not in err, err
    assert len(errors) == 1 and expected in errors[0], err


@pytest.mark.parametrize("command, kind, case, expected", LOCAL_CASES, ids=[f"{c[0]}: {c[2]}" for c in LOCAL_CASES])
def test_bad_input_is_one_line_and_writes_nothing(command, kind, case, expected, tmp_path, tiny_llama_dir, converted,
                                                  capfd, monkeypatch):
    args, how = arrange(command, case, tmp_path, tiny_llama_dir, converted)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / HF_CACHE))
    before = snapshot(tmp_path)
    if how == "here":
        monkeypatch.setattr(sys, "argv", ["longrope-convert", *map(str, args)])
        with pytest.raises(SystemExit) as exited:
            cli.main()
        code, (out, err) = exited.value.code, capfd.readouterr()
    elif how == "mount point":  # in a mount namespace of its own, the output is bound onto itself
        if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
            pytest.skip("needs unshare with user and mount namespaces")
        output = shlex.quote(str(args[args.index("--output") + 1]))
        command = shlex.join([sys.executable, "-m", "longrope_convert", *map(str, args)])
        done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {output} {output} && {command}"],
                              capture_output=True, text=True)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        done = subprocess.run([sys.executable, "-m", "longrope_convert", *map(str, args)], capture_output=True,
                              text=True, preexec_fn=unprivileged if how == "unprivileged" else file_size_limit)
        code, out, err = done.returncode, done.stdout, done.stderr
    if (tmp_path / "readonly").exists():
        (tmp_path / "readonly").chmod(0o755)  # so that pytest can clean up
    one_line(code, out, err, expected)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command, kind, case, expected", PUSH_CASES, ids=[c[2] for c in PUSH_CASES])
def test_push_bad_input_is_one_line_and_writes_nothing(command, kind, case, expected, hub, tmp_path, tiny_llama_dir):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
           "HF_TOKEN": "hf_TESTtoken", "HF_HUB_DISABLE_TELEMETRY": "1"}
    source, target, files = "org/testbed", "me/pushed", {p.name: p.read_bytes() for p in TESTBED.iterdir()}
    if case == "repo id not valid":
        target = "not a/valid id"
    elif case == "no login":
        del env["HF_TOKEN"]
    elif case == "Hub source without output head":
        source = "org/headless"
        files = {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir()}
        tensors = load_file(tiny_llama_dir / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, tmp_path / "headless.safetensors", metadata={"format": "pt"})
        files["model.safetensors"] = (tmp_path / "headless.safetensors").read_bytes()
        (tmp_path / "headless.safetensors").unlink()
    elif case == "HF_HUB_OFFLINE set":
        env["HF_HUB_OFFLINE"] = "1"
    elif case == "Hub source with truncated weights":
        source = "org/truncated"
        files["model.safetensors"] = files["model.safetensors"][:-100]
    if hub.store.create(source):
        hub.store.upload(source, files)
    args = [source, "--target", 1024, "--output", tmp_path / "out", "--push-to", target]
    done = subprocess.run([sys.executable, "-m", "longrope_convert", *map(str, args)], env=env, capture_output=True,
                          text=True)
    one_line(done.returncode, done.stdout, done.stderr, expected)
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf-home"] == []
    assert not [p for p in (tmp_path / "hf-home").rglob("*") if {"blobs", "snapshots"} & set(p.parts)]
    assert hub.store.load(target) is None if case != "repo id not valid" else True


@pytest.mark.parametrize("code, says", [
    (errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
    (errno.EBUSY, "in use by another process"), (errno.ENAMETOOLONG, "the name is too long"),
    (errno.EIO, os.strerror(errno.EIO)),
])
def test_os_errors_are_one_line_naming_the_paths(code, says):
    error = OSError(code, os.strerror(code), "/models/llama/model.safetensors", None, "/out/.out.partial-1-x/m")
    line = cli.os_error_message(error)
    assert line.startswith("'/models/llama/model.safetensors' -> '/out/.out.partial-1-x/m': ") and says in line
    assert "\n" not in line
    assert cli.os_error_message(OSError("Can't load tokenizer for 'x'.\nMake sure that ...")) == (
        "Can't load tokenizer for 'x'.")


def test_push_command_offline_says_offline_mode(converted, tmp_path, capfd, monkeypatch):
    """`push` and the library's push_folder, with HF_HUB_OFFLINE set: offline mode named, nothing written."""
    from longrope_convert.errors import HubError
    from longrope_convert.publish import push_folder

    folder = tmp_path / "checkpoint"
    shutil.copytree(converted, folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_TESTtoken")
    before = snapshot(tmp_path)
    monkeypatch.setattr(sys, "argv", ["longrope-convert", "push", str(folder), "--to", "me/pushed"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    one_line(exited.value.code, *capfd.readouterr(), "HF_HUB_OFFLINE is set: pushing to 'me/pushed' needs")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set: pushing to 'me/pushed'"):
        push_folder(folder, "me/pushed")  # without the CLI's check first: the Hub call itself fails offline
    assert snapshot(tmp_path) == before
