"""The model card: metadata, honest provenance, and refreshing only the sections the tool wrote."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from longrope_convert.card import (
    CARD_FILE,
    front_matter,
    hub_model_id,
    model_card,
    refresh_card,
)
from longrope_convert.checkpoint_files import FACTORS_FILE
from longrope_convert.convert import write_checkpoint
from longrope_convert.evaluate import comparison_sets
from longrope_convert.factors import analytic_factor_set, load_factor_set
from longrope_convert.source import read_source

ROOT = Path(__file__).parents[1]
TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"
SEARCHED = ROOT / "factors" / "tiny-llama-256" / "2048.json"
EXAMPLE = ROOT / "examples" / "SmolLM2-135M-LongRoPE-16k"
LEGACY_CARD = Path(__file__).parent / "data" / "legacy-card"  # the example's files before cards had markers


def test_card_metadata_and_honest_provenance():
    init = analytic_factor_set("yarn", read_source(TESTBED).fingerprint, 2048)
    card = model_card(init, "me/tiny", {"license": "apache-2.0"}, "me/tiny-longrope", revision="abc123")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata == {"base_model": "me/tiny", "license": "apache-2.0", "library_name": "transformers",
                        "pipeline_tag": "text-generation", "tags": ["longrope", "long-context", "llama"]}
    assert "**not searched**: `init:yarn`" in card and "searched**" not in card.replace("not searched", "")
    assert 'from_pretrained("me/tiny-longrope", trust_remote_code=True, revision="abc123")' in card
    assert "Without remote code" in card and "## Evaluation" not in card
    card = model_card(load_factor_set(SEARCHED), None, {}, "me/x")
    assert "Factors **searched** (`search`)" in card and "| evaluations |" in card
    assert "base_model" not in front_matter(card) and "license" not in front_matter(card)
    assert "`tiny-llama-256` with its context window extended from 256 to 2,048 tokens" in card


def test_the_card_says_what_stock_readers_change_and_why_a_baseline_was_written():
    """Stock readers apply the attention factor to short inputs too: only a factor other than 1 (YaRN's) makes them
    differ from the source there, not llama3's 1. A search whose verdict is a baseline says so, not 'run a search'."""
    fingerprint = read_source(TESTBED).fingerprint
    yarn, llama3 = (analytic_factor_set(method, fingerprint, 2048) for method in ("yarn", "llama3"))
    assert llama3.long_mscale == 1.0 and yarn.long_mscale > 1.0
    differs = "the attention factor is applied to short inputs too, so they are not exactly the source model"
    assert differs in model_card(yarn, None, {}, "me/x") and differs not in model_card(llama3, None, {}, "me/x")
    verdict = replace(llama3, provenance={**llama3.provenance, "method": "baseline:llama3"})
    card = model_card(verdict, None, {}, "me/x")
    assert "`baseline:llama3`, an analytic set that the search measured better than every candidate" in card
    assert "run `longrope-convert search`" not in card


def test_a_search_without_evolution_is_not_called_searched():
    searched = load_factor_set(SEARCHED)
    warning = "The budget ended before any evolution step: these are the best starting factors."
    stopped = replace(searched, provenance={**searched.provenance, "method": "search:no-evolution", "warning": warning})
    card = model_card(stopped, None, {}, "me/x")
    assert "**not searched by evolution**" in card and "Factors **searched**" not in card
    assert f"**Warning:** {warning}" in card
    assert not stopped.is_searched and list(comparison_sets(stopped, baselines=False)) == [
        "LongRoPE (search:no-evolution)"]
    short = replace(searched, provenance={**searched.provenance, "method": "search:short"})
    assert short.is_searched and "Factors **searched** (`search:short`) by evolution" in model_card(
        short, None, {}, "me/x")


def test_base_model_is_a_hub_id_only_from_a_hub_cache_snapshot(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(TESTBED, snapshot)
    assert hub_model_id(snapshot) == "org/tiny-llama" and hub_model_id(TESTBED) is None
    assert hub_model_id(tmp_path / "hub" / "models--gpt2" / "snapshots" / "abc") == "gpt2"
    for folder, base_model in [(snapshot, "org/tiny-llama"), (TESTBED, None)]:
        source = read_source(folder)
        factor_set = analytic_factor_set("pi", source.fingerprint, 1024)
        output = tmp_path / f"out-{base_model is None}"
        write_checkpoint(source, factor_set, output, "init:pi")
        assert front_matter((output / CARD_FILE).read_text()).get("base_model") == base_model


EVALUATION = {"perplexity": {"documents": ["a.txt"], "skipped_documents": 0, "protocol": "truncated", "stride": None,
                             "perplexity": {"LongRoPE": {"256": 9.5, "2048": "inf"}}},
              "settings": {"command": "longrope-convert eval x", "device": "cpu, float32", "created": "2026-12-01"}}


def converted_folder(tmp_path: Path, card: str) -> Path:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    shutil.copyfile(SEARCHED, folder / FACTORS_FILE)
    shutil.copyfile(TESTBED / "tokenizer.json", folder / "tokenizer.json")
    (folder / CARD_FILE).write_text(card)
    return folder


def write_evaluation(folder: Path, evaluation: dict) -> None:
    (folder / "eval").mkdir(exist_ok=True)
    (folder / "eval" / "results.json").write_text(json.dumps(evaluation))


def without_section(card: str, name: str) -> str:
    begin, end = f"<!-- longrope-convert:begin {name}", f"<!-- longrope-convert:end {name} -->"
    return card[:card.index(begin)] + card[card.index(end) + len(end):]


def test_refreshing_rewrites_only_the_tools_sections(tmp_path):
    card = model_card(load_factor_set(SEARCHED), "org/tiny", {"license": "mit"}, "me/tiny-2k", revision="dev")
    head, body = card.split("\n---\n", 1)
    user_head = head + "\nlanguage:\n- en\ndatasets:\n- pg19  # the books\n---\n"
    user_body = body.replace("<!-- longrope-convert:begin factors",
                             "## Intended use\n\nResearch on long documents.\n\n<!-- longrope-convert:begin factors")
    folder = converted_folder(tmp_path, user_head + user_body + "\n## Citation\n\nMine, 2026.\n")
    write_evaluation(folder, EVALUATION)
    refreshed = refresh_card(folder)
    assert refreshed.startswith(user_head)  # the front matter, byte for byte
    assert front_matter(refreshed)["datasets"] == ["pg19"] and front_matter(refreshed)["language"] == ["en"]
    assert "## Intended use\n\nResearch on long documents.\n\n" in refreshed and refreshed.endswith(
        "## Citation\n\nMine, 2026.\n")
    assert refreshed.index("## How to load") < refreshed.index("## Evaluation") < refreshed.index("## Citation")
    assert 'from_pretrained("me/tiny-2k", trust_remote_code=True, revision="dev")' in refreshed  # not the folder
    assert "| LongRoPE | 9.500 | inf |" in refreshed
    assert refresh_card(folder) == refreshed  # nothing to change: the same card
    write_evaluation(folder, {**EVALUATION, "perplexity": {**EVALUATION["perplexity"], "perplexity": {
        "LongRoPE": {"256": 9.25, "2048": 11.0}}}})
    again = refresh_card(folder)
    assert "| LongRoPE | 9.250 | 11.000 |" in again and "| LongRoPE | 9.500 | inf |" not in again
    assert without_section(again, "evaluation") == without_section(refreshed, "evaluation")
    assert refresh_card(folder, repo="me/elsewhere").count('"me/elsewhere"') == 3  # marker, model, tokenizer


def test_a_card_written_before_markers_is_refreshed_by_its_headings(tmp_path):
    folder = tmp_path / "legacy"
    shutil.copytree(EXAMPLE, folder)
    for legacy_file in LEGACY_CARD.iterdir():
        shutil.copyfile(legacy_file, folder / legacy_file.name)
    legacy = (folder / CARD_FILE).read_text()
    head = legacy[:legacy.index("\n---\n") + 5]
    user = legacy.replace(head, head.replace("---\n", "---\nlanguage: en\n", 1)) + "\n## Notes\n\nMy own notes.\n"
    (folder / CARD_FILE).write_text(user)
    refreshed = refresh_card(folder)
    assert refreshed.startswith(head.replace("---\n", "---\nlanguage: en\n", 1))
    assert refreshed.endswith("## Notes\n\nMy own notes.\n")
    for name in ("summary", "factors", "usage", "evaluation"):
        assert refreshed.count(f"<!-- longrope-convert:begin {name}") == 1
    assert refreshed.count("## Factors") == refreshed.count("## How to load") == refreshed.count("## Evaluation") == 1
    assert 'from_pretrained("SmolLM2-135M-LongRoPE-16k", trust_remote_code=True)' in refreshed
    assert refresh_card(folder) == refreshed


@pytest.mark.parametrize("existing", ["", "# Just a title I wrote\n"])
def test_a_card_without_tool_sections_gets_them_after_its_text(tmp_path, existing):
    folder = converted_folder(tmp_path, existing)
    refreshed = refresh_card(folder)
    assert front_matter(refreshed)["library_name"] == "transformers"
    assert existing in refreshed and refreshed.index("<!-- longrope-convert:begin summary") > len(existing)


def test_the_tokenizer_is_loaded_in_the_card_and_the_push_snippet_only_when_the_checkpoint_has_one(tiny_source,
                                                                                                   tmp_path):
    from longrope_convert.publish import loading_snippet

    with_tokenizer, without = tmp_path / "testbed-2k", tmp_path / "tiny-256"
    write_checkpoint(read_source(TESTBED), analytic_factor_set("yarn", read_source(TESTBED).fingerprint, 2048),
                     with_tokenizer, "init:yarn")
    tiny = read_source(tiny_source)  # saved without tokenizer files
    write_checkpoint(tiny, analytic_factor_set("yarn", tiny.fingerprint, 256), without, "init:yarn")
    assert 'AutoTokenizer.from_pretrained("' in (with_tokenizer / CARD_FILE).read_text()
    assert 'AutoTokenizer.from_pretrained("' in loading_snippet("me/testbed-2k", "abc123", with_tokenizer)
    for text in ((without / CARD_FILE).read_text(), refresh_card(without), loading_snippet("me/tiny", "abc", without)):
        assert "AutoTokenizer" not in text and 'AutoModelForCausalLM.from_pretrained("' in text
    assert "The checkpoint has no tokenizer files" in (without / CARD_FILE).read_text()


@pytest.mark.parametrize("shipped", sorted((ROOT / "factors").glob("*/*.json")), ids=lambda path: path.parent.name)
def test_shipped_factor_files_name_their_data_without_a_path_and_cards_show_whole_counts(shipped):
    """Each shipped file records its data by name and content hash (no path of the machine it was searched on);
    its card shows them by name and whole counts without '.0'. A file written before (a path, 24.0) shows the
    same."""
    factor_set = load_factor_set(shipped)
    data = factor_set.provenance["data"]
    assert all(set(entry) == {"name", "sha256"} and "/" not in entry["name"] for entry in data)
    rows = {line.split(" | ")[0]: line for line in model_card(factor_set, None, {}, "me/x").splitlines()
            if line.startswith("| ")}
    assert rows["| data"] == "| data | " + ", ".join(f"`{e['name']}` (sha256 `{e['sha256'][:12]}`)" for e in data) + " |"
    older = replace(factor_set, provenance={**factor_set.provenance, "evaluations": 24.0, "budget": {"max_evals": 24.0},
                                            "data": ["../shared/corpus/prose/austen.txt", "pg19:test"]})
    card = model_card(older, None, {}, "me/x")
    assert "| evaluations | 24 |" in card and '{"max_evals": 24}' in card and "24.0" not in card
    assert "| data | `austen.txt`, `pg19:test` |" in card and "shared" not in card


def test_the_evaluation_names_its_texts_without_a_path():
    accuracy = {"LongRoPE": {"1024": {"0.5": 1.0}}}
    evaluation = {**EVALUATION, "perplexity": {**EVALUATION["perplexity"], "documents": ["/home/me/corpus/a.txt"]},
                  "needles": {"depths": [0.5], "trials": 1, "seed": 0, "chat_template": False, "source_window": None,
                              "haystack": "/home/me/corpus/books.jsonl:1, ../corpus/b.txt",
                              "tasks": {"niah_single": {"accuracy": accuracy}}}}
    card = model_card(load_factor_set(SEARCHED), None, {}, "me/x", evaluation=evaluation)
    assert "haystack from books.jsonl:1, b.txt" in card and "(a.txt)" in card and "corpus" not in card
