"""Needle items (RULER's tasks and the passkey): exact sizes, needles where they were put, answers from the ids,
the chat template, scoring. Tokenizers only: no model runs here."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import DATA
from longrope_convert.needles import (
    NEEDLE_TASKS,
    ItemTooShort,
    build_item,
    build_items,
    chat_frame,
    haystack_from_texts,
    haystack_windows,
    item_seed,
    noise_haystack,
    objective_items,
    read_passkey,
    required_tokens,
    string_match_all,
    tokenized_haystack,
)

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TESTBED)


@pytest.fixture(scope="module")
def haystacks(tokenizer):
    text = (DATA / "sherlock_holmes_excerpt.txt").read_text()
    return {"data": haystack_from_texts(tokenizer, [("sherlock", text)], 4096), "noise": noise_haystack(tokenizer, 4096)}



@pytest.mark.parametrize("name", list(NEEDLE_TASKS))
@pytest.mark.parametrize("gold", [False, True])
def test_items_fill_the_length_exactly_and_hold_their_needles_at_depth(tokenizer, haystacks, name, gold):
    task = NEEDLE_TASKS[name]
    haystack = haystacks[task.haystack]
    for length in (required_tokens(tokenizer, task, item_seed(0, name, 1000, 0.5, 0), gold=gold) + 40, 1000, 4096):
        for depth in (0.0, 0.25, 0.5, 1.0):
            item = build_item(tokenizer, task, haystack, length, depth, item_seed(0, name, length, depth, 0), gold=gold)
            assert len(item.input_ids) == (length if gold else length - task.answer_tokens)
            assert item.input_ids[0] == tokenizer.bos_token_id and not item.chat_template
            text = tokenizer.decode(item.input_ids[:item.answer_span[0]] if gold else item.input_ids)
            drawn = item.needles
            assert text.endswith(drawn.question + drawn.answer_prefix)  # never cut
            assert text.startswith(tokenizer.bos_token + drawn.intro)
            for needle in drawn.needles:
                assert needle in text
            if gold:  # the expected answer's tokens close the item; only its values' tokens are to be scored
                assert item.answer_span[1] == length
                assert tokenizer.decode(item.input_ids[item.answer_span[0]:]) == drawn.gold
                scored = item.answer_positions
                assert item.answer_span[0] <= scored[0] and scored[-1] < length
                assert tokenizer.decode([item.input_ids[p] for p in scored]).replace(" ", "") == "".join(item.answers)
                rest = [p for p in range(*item.answer_span) if p not in scored]  # separators and the full stop
                assert not any(c.isalnum() for c in tokenizer.decode([item.input_ids[p] for p in rest]))
            # each needle's value, read back from the ids at the positions given
            for (first, end), positions, value in zip(item.needle_spans, item.value_positions, item.values):
                assert first <= positions[0] and positions[-1] < end
                assert tokenizer.decode([item.input_ids[p] for p in positions]).strip() == value
            assert item.asked == [value in item.answers for value in item.values] and any(item.asked)
            # the first needle asked about sits at the sentence start nearest to the depth
            placed = item.values.index(drawn.values_in_needles[0])
            prefix = 1 + len(tokenizer(drawn.intro, add_special_tokens=False).input_ids)
            before = item.needle_spans[placed][0] - prefix - sum(e - s for s, e in item.needle_spans[:placed])
            starts = [s for s in haystack.sentence_starts if s < item.haystack_tokens] + [item.haystack_tokens]
            assert before == min(starts, key=lambda s: (abs(s - depth * item.haystack_tokens), s))


def test_items_are_the_same_for_a_seed_and_differ_between_trials(tokenizer, haystacks):
    task = NEEDLE_TASKS["niah_multikey"]
    first = build_items(tokenizer, task, haystacks["data"], [600, 900], [0.2, 0.8], trials=2, seed=5)
    again = build_items(tokenizer, task, haystacks["data"], [600, 900], [0.2, 0.8], trials=2, seed=5)
    assert [item.input_ids for item in first] == [item.input_ids for item in again]
    assert len({tuple(item.input_ids) for item in first}) == len(first) == 8
    other = build_items(tokenizer, task, haystacks["data"], [600, 900], [0.2, 0.8], trials=2, seed=6)
    assert [item.answers for item in other] != [item.answers for item in first]


def test_variable_tracking_keeps_its_chain_in_order(tokenizer, haystacks):
    for depth in (0.0, 0.5, 0.9, 1.0):
        item = build_item(tokenizer, NEEDLE_TASKS["vt"], haystacks["data"], 2000, depth, item_seed(1, "vt", 2000, depth, 0))
        text = tokenizer.decode(item.input_ids)
        assert [text.index(needle) for needle in item.needles.needles] == sorted(
            text.index(needle) for needle in item.needles.needles)
        value = item.needles.needles[0].split("= ")[1].rstrip(".")
        assert text.endswith(f"5 variables are assigned the value {value}, they are:")
        assert item.answers == [needle.split()[1] for needle in item.needles.needles]


def test_a_length_too_small_for_the_fixed_text_is_refused_with_what_it_needs(tokenizer, haystacks):
    task = NEEDLE_TASKS["niah_multiquery"]
    needed = max(required_tokens(tokenizer, task, item_seed(0, task.name, 300, depth, trial))
                 for depth in (0.1, 0.9) for trial in range(3))
    with pytest.raises(ItemTooShort) as refused:
        build_items(tokenizer, task, haystacks["data"], [300], [0.1, 0.9], 3)
    assert (refused.value.task, refused.value.length, refused.value.needed) == ("niah_multiquery", 300, needed)
    assert needed > 300
    fits = max(required_tokens(tokenizer, task, item_seed(0, task.name, 500, depth, trial))
               for depth in (0.1, 0.9) for trial in range(3))
    items = build_items(tokenizer, task, haystacks["data"], [500], [0.1, 0.9], 3)
    assert min(item.haystack_tokens for item in items) == 500 - fits


def test_the_chat_template_wraps_the_prompt_and_is_recorded(smollm2_dir, haystacks):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    head, tail = chat_frame(tokenizer, True)
    assert head.startswith("<|im_start|>") and tail.endswith("<|im_start|>assistant\n")
    haystack = tokenized_haystack(tokenizer, (DATA / "sherlock_holmes_excerpt.txt").read_text(), "sherlock")
    task = NEEDLE_TASKS["niah_single"]
    item = build_item(tokenizer, task, haystack, 1500, 0.5, item_seed(0, "niah_single", 1500, 0.5, 0),
                      chat=(head, tail))
    assert item.chat_template and len(item.input_ids) == 1500 - task.answer_tokens
    text = tokenizer.decode(item.input_ids)
    assert text.startswith(head + item.needles.intro)
    assert text.endswith(item.needles.question + tail + item.needles.answer_prefix)
    plain = build_item(tokenizer, task, haystack, 1500, 0.5, item_seed(0, "niah_single", 1500, 0.5, 0))
    assert not plain.chat_template and "<|im_start|>assistant" not in tokenizer.decode(plain.input_ids)
    assert chat_frame(tokenizer, False) == ("", "")
    assert chat_frame(AutoTokenizer.from_pretrained(TESTBED), True) == ("", "")  # it has no template


def test_objective_items_take_a_window_each_with_their_depths_spread(tokenizer):
    """The search's needle objective: one gold item per haystack window (each text's first window, then second
    windows), exactly the length, first needles at depths spread over the items, the haystack cut only."""
    texts = [(f"chapter{i}", json.loads(line)["text"])
             for i, line in enumerate((DATA / "tom_sawyer_chapters.jsonl").read_text().splitlines())]
    windows, skipped = haystack_windows(tokenizer, [("short", "Too short."), *texts], 2048, 8)
    assert skipped == 1
    assert [w.name for w in windows] == [f"chapter{i}" for i in range(6)] + ["chapter0#window2", "chapter3#window2"]
    assert all(len(w.ids) == 2048 and w.sentence_starts[0] == 0 for w in windows)
    items = objective_items(tokenizer, windows, 2048)
    assert [item.depth for item in items] == [(k + 0.5) / 8 for k in range(8)]
    for item, window in zip(items, windows):
        assert len(item.input_ids) == 2048 and item.answer_span[1] == 2048 and len(item.answers) == 4
        haystack, cut = [], 1 + len(tokenizer(item.needles.intro, add_special_tokens=False).input_ids)
        for first, end in item.needle_spans:  # what lies between the needles is the window's text, in order
            haystack += item.input_ids[cut:first]
            cut = end
        suffix = tokenizer(item.needles.question + item.needles.answer_prefix, add_special_tokens=False).input_ids
        haystack += item.input_ids[cut:item.answer_span[0] - len(suffix)]
        assert haystack == window.ids[:item.haystack_tokens]
        assert item.input_ids[item.answer_span[0] - len(suffix):item.answer_span[0]] == suffix
    with pytest.raises(ItemTooShort):
        objective_items(tokenizer, windows[:1], 200)


def test_sentence_starts_are_where_sentences_start(tokenizer):
    haystack = tokenized_haystack(tokenizer, 'He came.  "Who?" she asked!\n\nNobody knew. The end', "t")
    rest = [tokenizer.decode(haystack.ids[i:]) for i in haystack.sentence_starts]
    assert rest == ['He came. "Who?" she asked! Nobody knew. The end', ' "Who?" she asked! Nobody knew. The end',
                    " she asked! Nobody knew. The end", " Nobody knew. The end", " The end", ""]


@pytest.mark.parametrize("output,answers,score", [
    (" 1234567.", ["1234567"], 1.0), ("The number is 1234567 and 7654321", ["7654321", "1234567"], 1.0),
    (" 1234567, 999", ["1234567", "7654321"], 0.5), (" none", ["1234567"], 0.0),
    (" ABCDE bcdef\x00", ["ABCDE", "BCDEF"], 1.0)])
def test_answers_are_scored_as_ruler_scores_them(output, answers, score):
    assert string_match_all(output, answers) == score


@pytest.mark.parametrize("answer,key", [(" 48213.", "48213"), ("48213", "48213"), (" **48213**", "48213"),
                                        (" 48 213", "48213"), (" 48,213!", "48213"), ("\n48213\nWhat", "48213"),
                                        (" 482130", "482130"), (" unknown", None), (" 4821", "4821"),
                                        (" 71432, 71432", "71432"), (" 71432 71432.", "71432"),
                                        (" 71,432, 71,432", "71432"), ("\n71432\n71432", "71432")])
def test_passkey_answers_are_read_from_generated_text(answer, key):
    assert read_passkey(answer) == key
    assert NEEDLE_TASKS["passkey"].score(answer, ["48213"]) == float(key == "48213")
