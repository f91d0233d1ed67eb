"""The factor search: fitness, in-place swapping, operators, resume, torch.distributed, real gains."""

import hashlib
import json
import math
import re
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from conftest import DATA, TINY_WINDOW, edit_json
from longrope_convert.card import _factors_section
from longrope_convert.job import resume_command
from longrope_convert.convert import longrope_config
from longrope_convert.errors import LongRoPEError
from longrope_convert.evolution import Candidate, SearchResult, SearchSpace
from longrope_convert.factors import analytic_factor_set, load_factor_set
from longrope_convert.perplexity import load_longrope_model, perplexity, token_nll, use_factor_set
from longrope_convert.search import (
    ModelFitness,
    SearchRun,
    Verdict,
    document_nll,
    long_search_task,
    plan_search,
    verdict,
)
from longrope_convert.search_log import LOG_VERSION, SearchLog
from longrope_convert.source import read_source
from longrope_convert.source_rope import critical_dimension
from longrope_convert.workers import Workers, gpu_group

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"
SEARCH_DATA = DATA / "tom_sawyer_chapters.jsonl"
HELD_OUT = DATA / "sherlock_adventures.jsonl"
CLI = [sys.executable, "-m", "longrope_convert"]
TOKENIZER = AutoTokenizer.from_pretrained(TESTBED)


def test_the_llama3_shaped_testbed_has_llama_3_8b_s_shape_where_rope_scaling_matters():
    """tests/testbed/tiny-llama3-256: 64 factors, grouped KV, and the critical dimension of Llama-3-8B at 8k."""
    config = json.loads((TESTBED.parent / "tiny-llama3-256" / "config.json").read_text())
    assert config["head_dim"] == 128 and config["num_key_value_heads"] < config["num_attention_heads"]
    assert critical_dimension(config["head_dim"], config["rope_parameters"]["rope_theta"],
                              config["max_position_embeddings"]) == 34  # as Llama-3-8B's (test_source_rope)


def model_with(folder, factor_set):
    source = read_source(folder)
    return load_longrope_model(folder, longrope_config(source.config, factor_set))


def test_chunked_fitness_equals_full_logits_perplexity(tiny_llama_dir):
    fingerprint = read_source(tiny_llama_dir).fingerprint
    factor_set = analytic_factor_set("yarn", fingerprint, 256)
    model = model_with(tiny_llama_dir, factor_set)
    ids = torch.randint(3, 256, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = math.exp(model(ids, labels=ids).loss.item())
    assert abs(perplexity(token_nll(model, ids, chunk_size=37)[0]) / reference - 1) <= 1e-4


def test_swapping_factors_in_place_equals_a_fresh_model(tiny_llama_dir):
    fingerprint = read_source(tiny_llama_dir).fingerprint
    first, second = (analytic_factor_set(m, fingerprint, 256) for m in ("pi", "yarn"))
    second = replace(second, n_hat=4, short_factor=[1.0, 1.0, 1.1, 1.2, 1.2, 1.3, 1.5, 2.0])
    swapped = model_with(tiny_llama_dir, first)
    use_factor_set(swapped, second)
    fresh = model_with(tiny_llama_dir, second)
    ids = torch.randint(3, 256, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for length in (200, TINY_WINDOW):  # long set and short set
            assert torch.equal(swapped(ids[:, :length]).logits, fresh(ids[:, :length]).logits)


def run_search(*args, env=None, stderr: list | None = None) -> dict:
    done = subprocess.run([*CLI, "search", *map(str, args), "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    if stderr is not None:
        stderr += done.stderr.splitlines()
    return json.loads(done.stdout)


def log_entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()[1:]]


def logged_candidates(log: Path) -> list[str]:
    return [entry["setting"] for entry in log_entries(log) if not entry["setting"].startswith("baseline:")]


def test_search_log_has_each_evaluation_once_and_valid_and_progress_per_evaluation(tmp_path):
    out, stderr = tmp_path / "f.json", []
    summary = run_search(TESTBED, "--target", 1024, "--data", SEARCH_DATA, "--documents", 2, "--max-evals", 30,
                         "--out", out, stderr=stderr)
    log = out.with_name("f.json.log.jsonl")
    header = json.loads(log.read_text().splitlines()[0])
    space = SearchSpace(**{**header["space"], "n_hat_choices": tuple(header["space"]["n_hat_choices"])})
    entries = log_entries(log)
    pairs = [(e["setting"], e["doc"]) for e in entries]
    assert len(pairs) == len(set(pairs))
    assert pairs[:10] == [(f"baseline:{name}", doc) for name in ("none", "pi", "ntk", "yarn", "llama3")
                          for doc in (0, 1)]  # the baselines first: a time budget may end the search
    for setting in set(logged_candidates(log)):
        n_hat, steps = setting.split(":")
        assert space.contains(Candidate(tuple(map(int, steps.split(","))), int(n_hat[1:])))
    factor_set = load_factor_set(out)
    assert factor_set.provenance["evaluations"] <= 30 and summary["iterations"] >= 1
    assert set(factor_set.provenance["baseline_perplexities"]) == {"none", "pi", "ntk", "yarn", "llama3"}
    if factor_set.method == "search":  # the label holds what it claims
        assert factor_set.provenance["best_perplexity"] <= min(factor_set.provenance["baseline_perplexities"].values())
    # stderr is not a terminal here: one status line per finished document evaluation, in order
    progress = [line for line in stderr if line.startswith("search: ") and "document evaluations done" in line]
    assert [int(line.split()[1].split("/")[0]) for line in progress] == list(range(1, len(entries) + 1))


def test_the_first_line_states_the_caps_and_one_long_document_gives_windows(tmp_path):
    """One chapter for --documents 3: three consecutive 1024-token windows of it, said on stderr and in the
    provenance; the critical space's caps come first, and the search stays within them, confirmation included."""
    chapter = tmp_path / "chapter.jsonl"
    chapter.write_text(SEARCH_DATA.read_text().splitlines()[0] + "\n")
    out, stderr = tmp_path / "f.json", []
    run_search(TESTBED, "--target", 1024, "--data", chapter, "--documents", 3, "--space", "critical", "--max-evals",
               12, "--out", out, stderr=stderr)
    caps = re.fullmatch(r"search: preset default, critical space: dimensions 12-31 searched, lambda >= the "
                        r"extension, a ramp below LongRoPE2's critical dimension 12; at most 12 evaluations \(one = a "
                        r"candidate on every document\), at most (\d+) document forwards of 1024 tokens in all "
                        r"\(3 documents, baselines included\)", stderr[0])
    assert caps and int(caps[1]) == 12 * 3 + 5 * 3  # the evolution's budget, then 5 baselines
    log = out.with_name("f.json.log.jsonl")
    assert len(log_entries(log)) <= int(caps[1])
    windows = [f"{chapter}:1", f"{chapter}:1#window2", f"{chapter}:1#window3"]
    assert [d["name"] for d in json.loads(log.read_text().splitlines()[0])["documents"]] == windows
    assert any(line.startswith("note: --data has 1 document of at least 1024 tokens for --documents 3: the search "
                               "takes consecutive 1024-token windows") for line in stderr)
    provenance = load_factor_set(out).provenance
    assert provenance["windows"] == ["chapter.jsonl:1", "chapter.jsonl:1#window2", "chapter.jsonl:1#window3"]
    assert provenance["space"] == {"name": "critical", "critical_dimension": 12}
    assert provenance["evaluations"] <= 12 and provenance["budget"]["max_evals"] == 12
    # the data by name and content, never by a path of this machine; counts as integers when whole
    assert provenance["data"] == [{"name": "chapter.jsonl", "sha256": hashlib.sha256(chapter.read_bytes()).hexdigest()}]
    assert str(tmp_path) not in out.read_text() and '"max_evals": 12,' in out.read_text()


def test_budgets_that_end_before_evolution_are_labelled_so_and_a_time_budget_holds(tmp_path):
    """The issue's case: --max-evals 1 scored one candidate (PI on the grid) and called it searched.
    Then the same log resumed with --time-budget 1: the budget's contract (not a speed goal) is that
    the run overshoots it by at most the evaluation in flight, plus the bookkeeping between
    evaluations (allowed 1 s on a loaded machine); the replayed evaluations guarantee a result."""
    out = tmp_path / "one.json"
    summary = run_search(TESTBED, "--target", 1024, "--data", SEARCH_DATA, "--documents", 2, "--max-evals", 1,
                         "--out", out)
    factor_set = load_factor_set(out)
    baselines = factor_set.provenance["baseline_perplexities"]
    best = min(baselines, key=baselines.get)
    # measured: one evaluation reaches 165.3 (PI on the grid); llama3 measures 104.6, so its factors are written
    assert factor_set.method == summary["method"] == f"baseline:{best}" and not factor_set.is_searched
    assert factor_set.long_factor == analytic_factor_set(best, read_source(TESTBED).fingerprint, 1024).long_factor
    assert factor_set.provenance["best_perplexity"] == round(baselines[best], 4)
    assert summary["search_best_perplexity"] > baselines[best] and factor_set.provenance["evaluations"] == 1
    assert "not searched ones" in factor_set.provenance["warning"]

    timed = tmp_path / "timed.json"
    log = out.with_name("one.json.log.jsonl")
    summary = run_search(TESTBED, "--target", 1024, "--data", SEARCH_DATA, "--documents", 2, "--time-budget", 1,
                         "--resume", log, "--out", timed)
    factor_set = load_factor_set(timed)
    budget = factor_set.provenance["budget"]
    longest = max(entry["seconds"] for entry in log_entries(log))
    assert budget["stopped_by"] == "time_budget" and summary["iterations"] == 0
    assert budget["seconds_this_run"] <= 1 + longest + 1.0
    assert factor_set.method in ("search:no-evolution", f"baseline:{best}") and factor_set.provenance["warning"]
    assert summary["best_perplexity"] == min(summary["search_best_perplexity"], *summary["baselines"].values())


def interrupt_when_logged(command: list[str], log: Path, lines: int, signal_number: int) -> str:
    """Run the command, send it a signal once the log has this many lines; its stderr. The command gets
    SIGINT's default handling even when this test runs as a background job (which inherits it ignored)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while process.poll() is None and (not log.exists() or len(log.read_text().splitlines()) < lines):
        time.sleep(0.05)
    process.send_signal(signal_number)
    _, stderr = process.communicate()
    assert process.returncode == (143 if signal_number == signal.SIGTERM else 130), stderr
    return stderr


def test_an_interrupted_search_says_how_to_resume_and_resumes_exactly_after_a_torn_line(tmp_path):
    common = [TESTBED, "--target", 1024, "--data", SEARCH_DATA, "--documents", 2, "--max-evals", 40,
              "--seed", 7, "--no-baselines"]
    whole = run_search(*common, "--out", tmp_path / "whole.json")

    out = tmp_path / "stopped.json"
    log = out.with_name("stopped.json.log.jsonl")
    stderr = interrupt_when_logged([*CLI, "search", *map(str, common), "--out", str(out)], log, 15, signal.SIGTERM)
    command = stderr.split("Continue it with:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith("longrope-convert search ") and command.endswith(f"--resume {log}")
    resume = [*CLI, *shlex.split(command)[1:]]
    assert not out.exists()

    with open(log, "r+b") as handle:  # what a kill in the middle of a write leaves: half a line, no newline
        size = handle.seek(0, 2)
        handle.truncate(size - 40)
    stderr = interrupt_when_logged(resume, log, 30, signal.SIGINT)
    assert f"--resume {log}" in stderr  # the same command again

    resumed = json.loads(subprocess.run([*resume, "--json"], capture_output=True, text=True, check=True).stdout)
    assert resumed["best_perplexity"] == whole["best_perplexity"]
    assert load_factor_set(out).long_factor == load_factor_set(tmp_path / "whole.json").long_factor
    assert logged_candidates(log) == logged_candidates(tmp_path / "whole.json.log.jsonl")  # each once, no fragment


def test_two_gloo_processes_find_the_same_best_as_one(tmp_path):
    common = ["--target", 1024, "--data", SEARCH_DATA, "--documents", 2, "--max-evals", 24, "--seed", 3,
              "--no-baselines"]
    single = run_search(TESTBED, *common, "--out", tmp_path / "one.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(29500 + os.getpid() % 1000), "-m", "longrope_convert", "search", str(TESTBED),
                           *map(str, common), "--out", str(tmp_path / "two.json"), "--json"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    two = json.loads(done.stdout)
    assert two["best_perplexity"] == single["best_perplexity"]
    assert load_factor_set(tmp_path / "two.json").long_factor == load_factor_set(tmp_path / "one.json").long_factor
    assert logged_candidates(tmp_path / "two.json.log.jsonl") == logged_candidates(tmp_path / "one.json.log.jsonl")


def held_out_perplexity(factor_set) -> float:
    from transformers import AutoTokenizer

    from longrope_convert.documents import read_documents
    from longrope_convert.perplexity import tokenized_documents

    model = model_with(TESTBED, factor_set)
    documents, _, _ = tokenized_documents(AutoTokenizer.from_pretrained(TESTBED), read_documents([str(HELD_OUT)]),
                                          2048)
    nll = torch.cat([token_nll(model, ids)[0] for ids in documents])
    return perplexity(nll)


def test_small_budget_search_beats_every_baseline_on_held_out_text(tmp_path):
    out = tmp_path / "searched.json"
    summary = run_search(TESTBED, "--target", 2048, "--data", SEARCH_DATA, "--max-evals", 60, "--out", out)
    searched = held_out_perplexity(load_factor_set(out))
    fingerprint = read_source(TESTBED).fingerprint
    baselines = {method: held_out_perplexity(analytic_factor_set(method, fingerprint, 2048))
                 for method in ("pi", "ntk", "yarn", "llama3")}
    print(f"tiny testbed at 8x, held-out ppl: searched {searched:.3f}, baselines {baselines}")
    # measured: searched 84.8; PI 148.8, NTK 108.8, YaRN 103.6 (the classic three by far), llama3 87.0
    assert all(searched < 0.9 * baselines[method] for method in ("pi", "ntk", "yarn"))
    assert searched < baselines["llama3"]
    assert summary["best_perplexity"] < min(summary["baselines"].values())  # on the search data too


def test_progressive_and_short_searches_compose_with_the_first_stage(tmp_path):
    stage_one = tmp_path / "stage1"
    subprocess.run([*CLI, str(TESTBED), "--target", "1024", "--factors", "yarn", "--output", str(stage_one)],
                   check=True, capture_output=True)
    first = load_factor_set(stage_one / "longrope_factors.json")
    out = tmp_path / "stage2.json"
    run_search(stage_one, "--target", 2048, "--data", SEARCH_DATA, "--documents", 2, "--max-evals", 12,
               "--no-baselines", "--out", out, "--convert-to", tmp_path / "stage2")
    second = load_factor_set(out)
    assert second.model.original_max_position_embeddings == 256 and second.target_length == 2048
    assert second.model.rope_scaling["long_factor"] == first.long_factor
    assert second.provenance["composition"]["extends"] == [1024, 2048]
    header = json.loads(out.with_name("stage2.json.log.jsonl").read_text().splitlines()[0])
    relative = [round(t / f, 6) for t, f in zip(second.long_factor, first.long_factor)]
    assert all(abs(r * 100 - round(r * 100)) < 1e-4 for r in relative)  # lambda_2 on the grid
    assert max(relative) <= 1.25 * 2 + 1e-9 and header["space"]["high"] == 250
    config = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert config["rope_scaling"]["original_max_position_embeddings"] == 256
    assert config["rope_scaling"]["long_factor"] == second.long_factor

    short = tmp_path / "short.json"
    summary = run_search(stage_one, "--short", "--data", SEARCH_DATA, "--documents", 2, "--max-evals", 10,
                         "--out", short)
    searched = load_factor_set(short)
    assert searched.long_factor == first.long_factor and searched.target_length == 1024
    assert summary["best_perplexity"] <= summary["baselines"]["before"]
    # 10 evaluations do not finish the initial population of 16: no evolution step, and it says so
    assert searched.method == "search:short:no-evolution" and not searched.is_searched
    assert "before any evolution step" in searched.provenance["warning"]


def test_resume_is_refused_when_a_document_the_config_or_the_weights_changed(tmp_path):
    """The log fingerprints each document's tokens and the model's files: an edited book under the same
    name, or a changed model, cannot replay old scores."""
    model, data, log = tmp_path / "model", tmp_path / "books.jsonl", tmp_path / "search.log.jsonl"
    shutil.copytree(TESTBED, model)
    shutil.copy(SEARCH_DATA, data)

    def open_search(resume: bool, target: int = 1024, objective: str = "ppl") -> SearchRun:
        return SearchRun(source=read_source(model), data=[str(data)], target=target, documents=2, log_path=log,
                         resume=resume, objective=objective)

    open_search(resume=False)
    with pytest.raises(LongRoPEError, match="exists; pass resume"):
        open_search(resume=False)
    open_search(resume=True)  # unchanged: accepted
    with pytest.raises(LongRoPEError, match="the setting 'target_length' changed"):  # not "document ... changed"
        open_search(resume=True, target=2048)
    with pytest.raises(LongRoPEError, match="the setting 'objective' changed \\(the log has 'ppl', this search 'needle'\\)"):
        open_search(resume=True, objective="needle")

    books = data.read_text()
    data.write_text(books.replace("Tom", "Sid", 1))
    with pytest.raises(LongRoPEError, match=r"document '.*books.jsonl:1' changed \(its tokens differ\)"):
        open_search(resume=True)
    data.write_text(books)

    config = model / "config.json"
    settings = config.read_text()
    edit_json(config, rms_norm_eps=1e-3)
    with pytest.raises(LongRoPEError, match="the model's config changed"):
        open_search(resume=True)
    config.write_text(settings)

    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LongRoPEError, match=r"the model's weights changed \(model.safetensors\)"):
        open_search(resume=True)


def test_the_needle_objective_scores_the_answer_values_only_on_whole_items(tmp_path):
    """--objective needle: each document is a needle item of exactly the target length, and its fitness is the NLL
    of the tokens of the answer's values: the masked sum of every token's NLL, blind to what follows them."""
    plan = plan_search(source=read_source(TESTBED), data=[str(SEARCH_DATA)], target=1024, documents=2,
                       objective="needle")
    assert "2 needle items, " in plan.caps_line and plan.needles.settings["task"] == "niah_multiquery"
    model = model_with(TESTBED, plan.task.base)
    factor_set = analytic_factor_set("yarn", read_source(TESTBED).fingerprint, 1024)
    for ids, scored in zip(plan.documents, plan.scored):
        assert ids.shape == (1, 1024) and ids[0, 0] == 0  # BOS, no chat template on the testbed
        digits = "".join(d for d in TOKENIZER.decode(ids[0, scored]) if not d.isspace())
        assert len(digits) == 4 * 7 and digits.isdigit() and scored.tolist() == sorted(scored.tolist())
        with torch.no_grad():
            nll, tokens = document_nll(model, factor_set, ids, scored)
            every = token_nll(model, ids)[0]  # with the set just swapped in; token p's NLL is every[p - 1]
            assert tokens == len(scored) and math.isclose(nll, every[scored - 1].double().sum().item(), rel_tol=1e-5)
            after = ids.clone()
            after[0, scored[-1] + 1:] = 3  # what follows the last value (the full stop) is not scored
            assert document_nll(model, factor_set, after, scored) == (nll, tokens)
            value = ids.clone()
            value[0, scored[-1]] = ids[0, scored[-2]] if ids[0, scored[-1]] != ids[0, scored[-2]] else 3
            assert document_nll(model, factor_set, value, scored)[0] != nll


def test_a_needle_search_writes_its_objective_and_words_its_fitness(tmp_path):
    out, stderr = tmp_path / "f.json", []
    summary = run_search(TESTBED, "--target", 1024, "--data", SEARCH_DATA, "--documents", 2, "--max-evals", 4,
                         "--no-baselines", "--objective", "needle", "--out", out, stderr=stderr)
    assert summary["objective"] == "needle"
    objective = load_factor_set(out).provenance["objective"]
    assert objective["name"] == "needle" and objective["depths"] == [0.25, 0.75] and len(objective["answer_tokens"]) == 2
    assert any(line.startswith("objective: answer-token perplexity of 2 niah_multiquery needle items")
               for line in stderr)
    assert any(line.startswith(f"wrote {out}: method ") and "answer-token perplexity" in line for line in stderr)
    done = subprocess.run([*CLI, "search", *map(str, (TESTBED, "--target", 300, "--data", SEARCH_DATA, "--objective",
                                                       "needle", "--out", tmp_path / "g.json"))],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "--objective needle: niah_multiquery at 300 tokens" in done.stderr
    with pytest.raises(LongRoPEError, match="needle_task applies to objective needle or ppl\\+needle"):
        plan_search(source=read_source(TESTBED), data=[str(SEARCH_DATA)], target=1024, needle_task="vt")
    section = _factors_section(load_factor_set(out), plotted=False)  # the card says what the fitness measured
    assert "| objective | needle: answer-token perplexity of 2 niah_multiquery items (" in section
    assert "| best_perplexity (answer tokens) |" in section


def test_ppl_then_needle_ranks_the_fittest_by_perplexity_on_needle_items(tmp_path):
    """--objective ppl+needle: the evolution on perplexity, then its 4 fittest scored on needle items (logged apart,
    as needle:<key>) and the one with the lowest answer-token perplexity written, with its own perplexity."""
    out = tmp_path / "f.json"
    summary = run_search(TESTBED, "--target", 1024, "--data", SEARCH_DATA, "--documents", 2, "--max-evals", 5,
                         "--no-baselines", "--objective", "ppl+needle", "--out", out)
    entries = log_entries(out.with_name("f.json.log.jsonl"))
    needle_entries = [e for e in entries if e["setting"].startswith("needle:")]
    after = [e for e in entries[entries.index(needle_entries[0]):] if not e["setting"].startswith("attention:")]
    assert len(needle_entries) == 4 * 2 and after == needle_entries  # after the evolution, before other scales
    factor_set = load_factor_set(out)
    ranked = factor_set.provenance["objective"]["ranked"]
    assert [r["answer_perplexity"] for r in ranked] == sorted(r["answer_perplexity"] for r in ranked)
    perplexities = {e["setting"] for e in entries if not e["setting"].startswith(("needle:", "attention:"))}
    assert {f"needle:{r['candidate']}" for r in ranked} == {e["setting"] for e in needle_entries}
    assert {r["candidate"] for r in ranked} <= perplexities
    assert summary["objective"] == "ppl+needle" and round(summary["search_best_perplexity"], 4) == ranked[0]["perplexity"]
    assert summary["needle_ranking"] == ranked
    assert "| objective | ppl+needle: perplexity, its 4 fittest ranked on the answer-token perplexity of 2 " in (
        _factors_section(factor_set, plotted=False))


def test_the_fitness_reports_each_evaluation_once_it_is_logged(tiny_llama_dir, tmp_path):
    """Per finished evaluation, not per batch: when on_result is called, that evaluation's line is in the log."""
    source = read_source(tiny_llama_dir)
    task = long_search_task(source.fingerprint, 256, n_hat=True)
    token_ids = [torch.randint(3, 256, (1, 100), generator=torch.Generator().manual_seed(doc)) for doc in range(3)]
    workers = Workers()
    log = SearchLog(tmp_path / "log.jsonl", lambda: {"version": LOG_VERSION}, resume=False, workers=workers)
    fitness = ModelFitness(model_with(tiny_llama_dir, task.base), token_ids, log, workers, task)
    lines_at_result = []
    fitness.nll([(task.initial[0], doc) for doc in range(3)],
                lambda candidate, doc, nll: lines_at_result.append(len(log.path.read_text().splitlines())),
                keep_going=lambda: True)
    assert lines_at_result == [2, 3, 4]  # header + 1, + 2, + 3
    stopped = []
    fitness.nll([(task.initial[1], doc) for doc in range(3)], lambda *result: stopped.append(result),
                keep_going=lambda: len(stopped) < 2)
    assert len(stopped) == 2  # keep_going is asked before each evaluation


def test_the_verdict_calls_searched_only_an_evolved_search_that_beats_every_measured_baseline():
    best = Candidate((100, 120), 0)

    def result(perplexity, iterations, stopped_by="patience", candidate=best):
        return SearchResult(best=candidate, best_perplexity=perplexity, history=[], evaluations=40.0,
                            iterations=iterations, stopped_by=stopped_by)

    baselines = {"none": 30.0, "yarn": 20.0}
    assert verdict(result(19.0, 3), baselines, long_mode=True) == Verdict("search")
    assert verdict(result(20.0, 3), baselines, long_mode=False) == Verdict("search:short")  # a tie is not worse
    assert verdict(result(19.0, 3), {}, long_mode=True) == Verdict("search")  # nothing measured to beat
    worse = verdict(result(21.0, 3), baselines, long_mode=True)
    assert (worse.method, worse.baseline) == ("baseline:yarn", "yarn") and "worse than YaRN (20.0000)" in worse.warning
    early = verdict(result(19.0, 0, "max_evals"), baselines, long_mode=True)
    assert early.method == "search:no-evolution" and "evaluation budget (--max-evals)" in early.warning
    assert verdict(result(19.0, 0, "time_budget"), baselines, long_mode=False).method == "search:short:no-evolution"
    nothing = result(math.inf, 0, "time_budget", candidate=None)
    assert verdict(nothing, baselines, long_mode=True).method == "baseline:yarn"
    with pytest.raises(LongRoPEError, match="time budget .* ended before any candidate or baseline"):
        verdict(nothing, {}, long_mode=True)


def test_each_torchrun_process_gets_its_share_of_the_gpus():
    assert gpu_group(0, 1, 8) == list(range(8))  # one process: one replica over all GPUs (with --device-map)
    assert gpu_group(3, 4, 8) == [6, 7]  # 4 replicas of 2 GPUs
    assert gpu_group(1, 2, 3) == [1]  # an uneven split leaves the last GPU out, never shares one
    with pytest.raises(LongRoPEError, match="8 processes per node but 4 GPUs"):
        gpu_group(0, 8, 4)


def test_the_resume_command_repeats_the_arguments_with_the_log(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    log = Path("runs/my search.log.jsonl")
    assert resume_command(["search", "./m", "--target", "2048", "--resume=old.jsonl", "--seed", "3"], log) == \
        "longrope-convert search ./m --target 2048 --seed 3 --resume 'runs/my search.log.jsonl'"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command(["search", "./m", "--resume", "old.jsonl"], log).startswith(
        "torchrun --nproc-per-node 8 -m longrope_convert search ./m --resume")


def test_a_model_with_nan_logits_is_named_as_such_not_blamed_on_the_budget(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TESTBED, model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    run = SearchRun(source=read_source(model), data=[str(SEARCH_DATA)], target=1024, documents=1, max_evals=2,
                    log_path=tmp_path / "search.log.jsonl")
    with pytest.raises(LongRoPEError, match=r"gave a NaN or infinite perplexity: the model's logits are not finite"):
        run.execute()


@pytest.mark.parametrize("preset, n_hat, searched", [("default", None, False), ("paper", None, True),
                                                     ("default", True, True), ("paper", False, False)])
def test_n_hat_is_searched_as_the_preset_says_unless_asked(preset, n_hat, searched):
    """The paper preset searches n_hat as the paper does; the default preset does not (it measured worse on held-out
    text, BENCHMARKS.md); --n-hat / --no-n-hat override either."""
    from longrope_convert.search import plan_search

    plan = plan_search(source=read_source(TESTBED), data=[str(SEARCH_DATA)], target=1024, documents=1, preset=preset,
                       n_hat=n_hat)
    choices = plan.task.space.n_hat_choices
    assert (choices == (0,)) != searched and (not searched or max(choices) == 128)
