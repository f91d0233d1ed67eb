"""Needle-in-a-haystack items: RULER's retrieval tasks (Hsieh et al., "RULER: What's the Real Context Size of
Your Long-Context Language Models?", arXiv 2404.06654; its generators scripts/data/synthetic/niah.py and
variable_tracking.py) built offline on the user's own text, and the classic passkey test (Mohtashami and
Jaggi, arXiv 2305.16300) on its repeated filler.

An item is built in tokens of the model's tokenizer, piece by piece, so that its size is exact:

    [chat head] intro  haystack ... needle ... haystack ... needle ... haystack  question [chat tail] answer prefix

The haystack is the only part that is cut (to the token): the intro, the needles, the question and the
room left for the answer never are. Needles go in at sentence starts of the haystack. The first needle the
question asks about sits at the item's depth (a fraction of the haystack); every other needle at a depth
drawn from the item's seed, as RULER draws them all (variable tracking: its later hops after the first, in
order). The token positions of each needle and of its value come from the assembled ids themselves.

With `gold=True` the expected answer's tokens follow the prompt and the item is exactly `length` tokens,
for scoring answers without generating (the search's needle objective: objective_items); otherwise the prompt
leaves `answer_tokens` tokens of room for generation and the answer is scored as RULER scores it (string_match_all: the share
of expected values found in the output, case-insensitive), the passkey as the first number answered.

Torch-free; deterministic for a seed.
"""

from __future__ import annotations

import random
import re
import string
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import EvaluationError

# Key words: RULER draws "adjective-noun" pairs from the wonderwords lists; these are our own short lists.
ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "damp", "distant", "eager",
              "fierce", "fragile", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lonely",
              "loud", "lucky", "mellow", "narrow", "nimble", "odd", "pale", "proud", "quiet", "rapid", "rough",
              "rusty", "silent", "slender", "smoky", "sober", "steady", "sticky", "swift", "tender", "tidy",
              "vivid", "wary", "wicked", "witty", "wooden", "young", "zealous")
NOUNS = ("anchor", "badger", "basket", "beacon", "bicycle", "blanket", "bottle", "bridge", "candle", "canyon",
         "castle", "cellar", "chimney", "compass", "cottage", "dolphin", "falcon", "fiddle", "garden", "glacier",
         "hammer", "harbor", "helmet", "kettle", "ladder", "lantern", "meadow", "mirror", "monkey", "orchard",
         "pencil", "pepper", "pillow", "pocket", "puzzle", "rabbit", "saddle", "shovel", "spider", "teapot",
         "thimble", "tractor", "trumpet", "tunnel", "violin", "wagon", "walnut", "window")

NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_VALUE_DIGITS = 7  # RULER's numbers
VT_VARIABLE_LETTERS = 5
VT_VALUE_DIGITS = 5
VT_HOPS = 4  # RULER's vt: one chain of four hops, five variables
NOISE_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_DIGITS = 5


@dataclass
class Needles:
    """What one item hides and asks: the text around the haystack, the needle sentences (needles[0] is the
    one placed at the item's depth) and the expected values."""

    intro: str  # before the haystack
    needles: list[str]
    question: str  # after the haystack, in the user's turn
    answer_prefix: str  # after the chat template's assistant start (RULER appends it to the template)
    answers: list[str]
    gold: str  # the expected answer as text, after the answer prefix
    values_in_needles: list[str]  # the value each needle holds, to find its tokens
    ordered: bool = False  # the other needles follow needles[0] in this order (a chain of assignments)


@dataclass(frozen=True)
class NeedleTask:
    """A task: how its needles are drawn, how much room its answer gets (RULER's tokens_to_generate), how an
    answer is scored, and what its haystack is ("data": the user's text; "noise": NOISE_FILLER repeated)."""

    name: str
    description: str
    answer_tokens: int
    draw: Callable[[random.Random], Needles]
    score: Callable[[str, list[str]], float]
    haystack: str = "data"


def _key(rng: random.Random, taken: set[str]) -> str:
    while (key := f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}") in taken:
        pass
    taken.add(key)
    return key


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def niah_needles(rng: random.Random, keys: int, values: int, queries: int) -> Needles:
    """RULER's niah task (niah.py, keys words, values numbers): `keys` keys with `values` numbers each, a needle
    per (key, value); the question asks for the numbers of `queries` of the keys. With one answer the
    wording is singular, as RULER rewrites it."""
    taken: set[str] = set()
    key_names = [_key(rng, taken) for _ in range(keys)]
    numbers = {key: [_number(rng, NIAH_VALUE_DIGITS) for _ in range(values)] for key in key_names}
    asked = rng.sample(key_names, queries)
    one = queries * values == 1
    kind = "number" if one else "numbers"
    pairs = [(key, value) for key in key_names for value in numbers[key]]
    rng.shuffle(pairs)
    first = next(i for i, (key, _) in enumerate(pairs) if key == asked[0])
    pairs.insert(0, pairs.pop(first))  # a needle the question asks about goes at the depth
    query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    answers = [value for key in asked for value in numbers[key]]
    if one:
        intro = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the number afterwards.\n")
        question = f"\nWhat is the special magic number for {query} mentioned in the provided text?"
        prefix = f" The special magic number for {query} mentioned in the provided text is"
    else:
        intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the numbers afterwards.\n")
        question = f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
        prefix = f" The special magic numbers for {query} mentioned in the provided text are"
    return Needles(intro=intro, needles=[NIAH_NEEDLE.format(kind="numbers", key=key, value=value)
                                         for key, value in pairs],
                   question=question, answer_prefix=prefix, answers=answers, gold=" " + ", ".join(answers) + ".",
                   values_in_needles=[value for _, value in pairs])


def _variables(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=VT_VARIABLE_LETTERS))
        if name not in names:
            names.append(name)
    return names


VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
                    "are assigned the value {value}, they are:")


def _chain(rng: random.Random) -> tuple[list[str], list[str], str]:
    names, value = _variables(rng, VT_HOPS + 1), _number(rng, VT_VALUE_DIGITS)
    assignments = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return names, assignments, value


def vt_needles(rng: random.Random) -> Needles:
    """RULER's variable tracking (variable_tracking.py, one chain of VT_HOPS hops): VAR A = 12345, VAR B = VAR A,
    ...; the question asks for every variable holding the value. Like RULER, a solved example (its chain in
    a few filler sentences) comes first."""
    names, assignments, value = _chain(rng)
    example_names, example_chain, example_value = _chain(rng)
    filler = NOISE_FILLER.strip().split(". ")
    example_context = " ".join(f"{sentence.rstrip('.')}." for pair in zip(filler, example_chain)
                               for sentence in pair)
    example = (VT_INTRO + example_context + VT_QUESTION.format(value=example_value)
               + VT_ANSWER_PREFIX.format(count=len(example_names), value=example_value) + " "
               + " ".join(example_names) + "\n\n")
    return Needles(intro=example + VT_INTRO, needles=assignments, question=VT_QUESTION.format(value=value),
                   answer_prefix=VT_ANSWER_PREFIX.format(count=len(names), value=value), answers=names,
                   gold=" " + " ".join(names), values_in_needles=names, ordered=True)


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."


def passkey_needles(rng: random.Random) -> Needles:
    """The passkey test: a PASSKEY_DIGITS-digit key in repeated filler, "What is the pass key?"."""
    key = _number(rng, PASSKEY_DIGITS)
    return Needles(intro=PASSKEY_INTRO, needles=[PASSKEY_LINE.format(key=key)], question="\nWhat is the pass key?",
                   answer_prefix=" The pass key is", answers=[key], gold=f" {key}.", values_in_needles=[key])


def read_passkey(generated: str, digits: int = PASSKEY_DIGITS) -> str | None:
    """The first number the model answered. Digit groups split by spaces or commas ("48 213", "48,213")
    are joined until they make `digits` digits, so a repeated key ("71432, 71432") is read once."""
    match = re.search(r"\d+(?:[,\s]+\d+)*", generated)
    if match is None:
        return None
    number = ""
    for group in re.findall(r"\d+", match.group(0)):
        if len(number) >= digits:
            break
        number += group
    return number


def string_match_all(output: str, answers: list[str]) -> float:
    """RULER's score of one output (scripts/eval/synthetic/constants.py): the share of the expected values
    found in it, case-insensitive, after control characters become line breaks."""
    output = re.sub(r"[\x00-\x1f]", "\n", output.strip()).strip().lower()
    return sum(answer.lower() in output for answer in answers) / len(answers)


def passkey_score(output: str, answers: list[str]) -> float:
    return float(read_passkey(output) == answers[0])


NEEDLE_TASKS: dict[str, NeedleTask] = {task.name: task for task in (
    NeedleTask("niah_single", "one needle, one key asked (RULER niah_single_2)", 128,
               lambda rng: niah_needles(rng, keys=1, values=1, queries=1), string_match_all),
    NeedleTask("niah_multikey", "four keys, one asked (RULER niah_multikey_1)", 128,
               lambda rng: niah_needles(rng, keys=4, values=1, queries=1), string_match_all),
    NeedleTask("niah_multivalue", "one key with four values, all asked (RULER niah_multivalue)", 128,
               lambda rng: niah_needles(rng, keys=1, values=4, queries=1), string_match_all),
    NeedleTask("niah_multiquery", "four keys, all asked (RULER niah_multiquery)", 128,
               lambda rng: niah_needles(rng, keys=4, values=1, queries=4), string_match_all),
    NeedleTask("vt", "variable tracking, one chain of four hops (RULER vt)", 30, vt_needles, string_match_all),
    NeedleTask("passkey", "a 5-digit key in repeated filler", 10, passkey_needles, passkey_score, haystack="noise"),
)}
RULER_TASKS = tuple(name for name in NEEDLE_TASKS if name != "passkey")


@dataclass
class Haystack:
    """Token ids of the haystack text and the token indices where its sentences start (len(ids) included:
    the end is a place to insert too)."""

    name: str
    ids: list[int]
    sentence_starts: list[int]


SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")


def tokenized_haystack(tokenizer, text: str, name: str) -> Haystack:
    """The haystack of `text` (whitespace runs made single spaces, as RULER does) in tokens, with its sentence
    starts: tokens whose first non-space character follows a sentence end. A tokenizer without offsets
    (a slow one) gives every token as a start."""
    text = re.sub(r"\s+", " ", text).strip()
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = encoded.get("offset_mapping")
    if offsets is None:
        return Haystack(name, ids, list(range(len(ids) + 1)))
    after_end = {match.end() for match in SENTENCE_END.finditer(text)}
    starts = [0]
    for index, (begin, end) in enumerate(offsets):
        piece = text[begin:end]
        if index and begin + len(piece) - len(piece.lstrip()) in after_end:
            starts.append(index)
    return Haystack(name, ids, starts + [len(ids)])


def haystack_from_texts(tokenizer, texts: Iterable[tuple[str, str]], tokens: int) -> Haystack:
    """At least `tokens` tokens of haystack from (name, text) pairs, read no further than needed; the texts are
    joined, and repeated when all of them are shorter (RULER repeats its essays). Raises EvaluationError when
    they hold no text."""
    names, pieces, count = [], [], 0
    for name, text in texts:
        text = re.sub(r"\s+", " ", text).strip()
        if not text:
            continue
        names.append(name)
        pieces.append(text)
        count += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count >= tokens:
            break
    if not pieces:
        raise EvaluationError("{data} holds no text for the haystack", setting="data")
    text = " ".join(pieces)
    while len((haystack := tokenized_haystack(tokenizer, text, ", ".join(names))).ids) < tokens:
        text = f"{text} {text}"
    return haystack


def noise_haystack(tokenizer, tokens: int) -> Haystack:
    """NOISE_FILLER repeated to at least `tokens` tokens."""
    text = NOISE_FILLER
    while len((haystack := tokenized_haystack(tokenizer, text, "noise filler")).ids) < tokens:
        text *= 2
    return haystack


class ItemTooShort(EvaluationError):
    """A length that cannot hold a task's prompt without haystack and its answer (`needed` tokens)."""

    def __init__(self, task: str, length: int, needed: int):
        super().__init__(f"{task} at {length} tokens: its prompt without haystack and its answer take {needed} tokens "
                         "with this tokenizer")
        self.task, self.length, self.needed = task, length, needed


@dataclass
class NeedleItem:
    """One prompt: `input_ids` (the prompt, or with gold=True the prompt and the expected answer: exactly
    `length` tokens); needle_spans[i] = (first, end) token positions of the i-th needle placed (in order of
    position); values[i] its value (for variable tracking: the variable it assigns), value_positions[i] the
    positions of that value's tokens, asked[i] whether the question asks for it; answer_span the expected
    answer's positions and answer_positions those of its values' tokens, without the separators between them
    (gold items; else None and [])."""

    task: str
    length: int
    depth: float
    trial: int
    input_ids: list[int]
    answers: list[str]
    needle_spans: list[tuple[int, int]]
    values: list[str]
    value_positions: list[list[int]]
    asked: list[bool]
    haystack_tokens: int
    answer_span: tuple[int, int] | None = None
    answer_positions: list[int] = field(default_factory=list)  # gold items: the tokens of the answer's values
    chat_template: bool = False
    needles: Needles | None = field(default=None, repr=False)


def chat_frame(tokenizer, use_chat_template: bool) -> tuple[str, str]:
    """The text before and after the user's message in the tokenizer's chat template (with the assistant's
    turn opened), or ("", "") without one."""
    if not (use_chat_template and getattr(tokenizer, "chat_template", None)):
        return "", ""
    marker = "\u2063NEEDLE-PROMPT\u2063"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    head, _, tail = rendered.partition(marker)
    return head, tail


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _value_positions(tokenizer, text: str, values: list[str], first: int) -> list[int]:
    """Positions (from `first`, where the tokens of `text` start) of the tokens that hold `values` in `text`,
    each value found after the one before."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans, begin = [], 0
    for value in values:
        begin = text.index(value, begin)
        spans.append((begin, begin + len(value)))
        begin += len(value)
    return [first + i for i, (a, b) in enumerate(offsets) if any(a < end and b > start for start, end in spans)]


def _pieces(tokenizer, task: NeedleTask, drawn: Needles, chat: tuple[str, str], gold: bool):
    """Token ids of the fixed parts of an item: prefix, suffix, each needle, the gold answer ([] unless gold);
    and the answer's room."""
    head, tail = chat
    prefix = _encode(tokenizer, head + drawn.intro)
    if not head and tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id, *prefix]
    suffix = _encode(tokenizer, drawn.question + tail + drawn.answer_prefix)
    needles = [_encode(tokenizer, " " + needle) for needle in drawn.needles]
    answer = _encode(tokenizer, drawn.gold) if gold else []
    return prefix, suffix, needles, answer, len(answer) if gold else task.answer_tokens


def required_tokens(tokenizer, task: NeedleTask, rng: random.Random, *, chat: tuple[str, str] = ("", ""),
                    gold: bool = False) -> int:
    """The tokens of the item `rng` draws without its haystack: the least length that holds it."""
    prefix, suffix, needles, _, room = _pieces(tokenizer, task, task.draw(rng), chat, gold)
    return len(prefix) + len(suffix) + sum(map(len, needles)) + room


def build_item(tokenizer, task: NeedleTask, haystack: Haystack, length: int, depth: float, rng: random.Random,
               *, chat: tuple[str, str] = ("", ""), gold: bool = False, trial: int = 0) -> NeedleItem:
    """One item of `task` at exactly `length` tokens: the prompt and task.answer_tokens of room, or with
    `gold` the prompt and the expected answer. `chat` is chat_frame's (head, tail); without a chat template
    the prompt starts with BOS when the tokenizer has one. Raises ItemTooShort when the fixed parts do not
    fit; `haystack` must hold at least `length` tokens (haystack_from_texts, noise_haystack)."""
    drawn = task.draw(rng)
    prefix, suffix, needles, answer, room = _pieces(tokenizer, task, drawn, chat, gold)
    fill = length - room - len(prefix) - len(suffix) - sum(map(len, needles))
    if fill < 0:
        raise ItemTooShort(task.name, length, length - fill)
    if fill > len(haystack.ids):
        raise ValueError(f"the haystack has {len(haystack.ids)} tokens, {fill} are needed")
    starts = haystack.sentence_starts[:bisect_left(haystack.sentence_starts, fill)] + [fill]
    places = [_nearest(starts, depth * fill)]
    later = [rng.uniform(depth, 1.0) if drawn.ordered else rng.random() for _ in needles[1:]]
    places += [_nearest(starts, d * fill) for d in (sorted(later) if drawn.ordered else later)]
    order = sorted(range(len(needles)), key=lambda i: (places[i], i))  # a chain's hops stay in order
    ids, cut, spans, values = list(prefix), 0, [], []
    for i in order:
        ids += haystack.ids[cut:places[i]]
        cut = places[i]
        spans.append((len(ids), len(ids) + len(needles[i])))
        values.append(_value_positions(tokenizer, " " + drawn.needles[i], [drawn.values_in_needles[i]], len(ids)))
        ids += needles[i]
    ids += haystack.ids[cut:fill] + suffix
    answer_span = (len(ids), len(ids) + len(answer)) if gold else None
    answer_positions = _value_positions(tokenizer, drawn.gold, drawn.answers, len(ids)) if gold else []
    ids += answer
    return NeedleItem(task=task.name, length=length, depth=depth, trial=trial, input_ids=ids, answers=drawn.answers,
                      needle_spans=spans, values=[drawn.values_in_needles[i] for i in order], value_positions=values,
                      asked=[drawn.values_in_needles[i] in drawn.answers for i in order], haystack_tokens=fill,
                      answer_span=answer_span, answer_positions=answer_positions, chat_template=bool(chat[0]),
                      needles=drawn)


def _nearest(starts: list[int], position: float) -> int:
    """The sentence start nearest to a token position (the earlier one on a tie)."""
    i = bisect_left(starts, position)
    candidates = starts[max(i - 1, 0):i + 1]
    return min(candidates, key=lambda start: (abs(start - position), start))


def item_seed(seed: int, task: str, length: int, depth: float, trial: int) -> random.Random:
    """The generator of one item: the same item for the same seed, task, length, depth and trial, whatever
    else is built (so every method sees the same prompts)."""
    return random.Random(f"{seed}:{task}:{length}:{depth!r}:{trial}")


def build_items(tokenizer, task: NeedleTask, haystack: Haystack, lengths: Iterable[int], depths: Iterable[float],
                trials: int, seed: int = 0, *, chat: tuple[str, str] = ("", ""), gold: bool = False) -> list[NeedleItem]:
    """Items of `task` for every length, depth and trial (see build_item), on one haystack. Raises ItemTooShort
    for the first length too small for one of its items, with the most tokens any of them needs."""
    items = []
    for length in lengths:
        seeds = [(depth, trial, item_seed(seed, task.name, length, depth, trial)) for depth in depths
                 for trial in range(trials)]
        needed = max(required_tokens(tokenizer, task, item_seed(seed, task.name, length, depth, trial), chat=chat,
                                     gold=gold) for depth, trial, _ in seeds)
        if needed > length:
            raise ItemTooShort(task.name, length, needed)
        items += [build_item(tokenizer, task, haystack, length, depth, rng, chat=chat, gold=gold, trial=trial)
                  for depth, trial, rng in seeds]
    return items


def haystack_windows(tokenizer, texts: Iterable[tuple[str, str]], tokens: int,
                     count: int) -> tuple[list[Haystack], int]:
    """`count` haystacks of `tokens` tokens from (name, text) pairs, and how many texts were too short: the first
    window of each text long enough, then, when those are fewer than `count`, their next windows ("NAME#window2",
    ...), as the perplexity objective takes documents. Fewer when the texts do not hold `count` windows; texts are
    read no further than needed."""
    long, skipped = [], 0
    for name, text in texts:
        if text.strip() and len((haystack := tokenized_haystack(tokenizer, text, name)).ids) >= tokens:
            long.append(haystack)
            if len(long) == count:
                break
        else:
            skipped += 1
    windows, window = [], 0
    while len(windows) < count and any(len(h.ids) >= (window + 1) * tokens for h in long):
        for haystack in long:
            if len(windows) < count and len(haystack.ids) >= (window + 1) * tokens:
                windows.append(_window(haystack, window * tokens, tokens, window + 1))
        window += 1
    return windows, skipped


def _window(haystack: Haystack, first: int, tokens: int, number: int) -> Haystack:
    end = first + tokens
    starts = [first] + [s for s in haystack.sentence_starts if first < s < end] + [end]
    name = haystack.name if number == 1 else f"{haystack.name}#window{number}"
    return Haystack(name, haystack.ids[first:end], [s - first for s in starts])


OBJECTIVE_TASK = "niah_multiquery"  # four needles and four questions per item: the most answer tokens of RULER's


def objective_items(tokenizer, haystacks: list[Haystack], length: int, *, task: str = OBJECTIVE_TASK, seed: int = 0,
                    chat: tuple[str, str] = ("", "")) -> list[NeedleItem]:
    """The items of a needle-driven search objective (LongRoPE2, arXiv 2502.20082: the loss on answer tokens only):
    a gold item of `task` of exactly `length` tokens on each haystack (haystack_windows), item k of n with its
    first needle at depth (k + 1/2) / n, so the depths spread across the items. Only the haystack is cut; each
    item's answer_positions are the tokens to score. Raises ItemTooShort when `length` cannot hold the task."""
    needle_task = NEEDLE_TASKS[task]
    depths = [(k + 0.5) / len(haystacks) for k in range(len(haystacks))]
    needed = max((required_tokens(tokenizer, needle_task, item_seed(seed, task, length, depth, k), chat=chat,
                                  gold=True) for k, depth in enumerate(depths)), default=0)
    if needed > length:
        raise ItemTooShort(task, length, needed)
    return [build_item(tokenizer, needle_task, haystack, length, depth, item_seed(seed, task, length, depth, k),
                       chat=chat, gold=True, trial=k) for k, (haystack, depth) in enumerate(zip(haystacks, depths))]
