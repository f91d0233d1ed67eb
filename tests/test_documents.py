"""--data: text files, JSONL, folders and `datasets` ids read as documents, lazily, with one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import DATA
from longrope_convert.convert import write_checkpoint
from longrope_convert.errors import DataError
from longrope_convert.factors import analytic_factor_set
from longrope_convert.documents import read_documents
from longrope_convert.perplexity import tokenized_documents
from longrope_convert.source import read_source

TESTBED = Path(__file__).parent / "testbed" / "tiny-llama-256"
BOOK = (DATA / "sherlock_holmes_excerpt.txt").read_text()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TESTBED)


def test_text_and_jsonl_must_be_utf8_and_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "one"}\n\n{"text": "caf\xe9"}\n')
    (tmp_path / "latin1.txt").write_bytes(b"first line\ncaf\xe9 au lait\n")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\n')
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9")
    for name, line in [("latin1.jsonl", 3), ("latin1.txt", 2)]:
        with pytest.raises(DataError, match=rf"^{tmp_path / name}:{line}: not UTF-8 \(byte 0xe9\); re-encode the file"):
            list(read_documents([str(tmp_path / name)]))
    assert [d.text for d in read_documents([str(tmp_path / "bom.jsonl"), str(tmp_path / "bom.txt")])] == ["café"] * 2
    (tmp_path / "number.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"number.jsonl:1: 'text' is a int, not a string"):
        list(read_documents([str(tmp_path / "number.jsonl")]))


def test_empty_and_whitespace_documents_are_skipped_and_counted(tmp_path, tokenizer):
    blank = " \n" * 2000  # thousands of whitespace tokens: long enough, but no document
    assert len(tokenizer(blank).input_ids) > 512
    rows = [{"text": blank}, {"text": ""}, {"text": "too short"}, {"text": BOOK}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ids, names, skipped = tokenized_documents(tokenizer, read_documents([str(tmp_path / "docs.jsonl")]), 512)
    assert names == [f"{tmp_path / 'docs.jsonl'}:4"] and skipped == 3 and ids[0].shape == (1, 512)


def test_reading_stops_once_enough_documents_are_found(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": BOOK}) + "\n" + json.dumps({"text": BOOK[5000:]}) + "\n")
    (tmp_path / "b.jsonl").write_text("not json\n")  # read only if a third document is needed
    _, names, _ = tokenized_documents(tokenizer, read_documents([str(tmp_path)]), 512, limit=2)
    assert names == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:2"]
    with pytest.raises(DataError, match=r"b.jsonl:1: not a JSON object with a 'text' field"):
        tokenized_documents(tokenizer, read_documents([str(tmp_path)]), 512, limit=3)


def test_a_streamed_dataset_is_read_no_further_than_needed(tmp_path):
    """A local dataset folder that `datasets` streams (three JSONL shards of a train split). The second
    ends with the two documents needed; the third is not JSON: pulling one row more would read it and
    fail the command, so success shows the stream was stopped."""
    source = read_source(TESTBED)
    checkpoint = write_checkpoint(source, analytic_factor_set("pi", source.fingerprint, 1024), tmp_path / "tiny-1k",
                                  "init:pi").output
    books = tmp_path / "books"
    books.mkdir()
    shards = [[{"text": "A short tale."}, {"text": " \n" * 2000}], [{"text": BOOK}, {"text": BOOK[10000:]}]]
    for number, rows in enumerate(shards):
        (books / f"train-0000{number}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (books / "train-00002.jsonl").write_text("this shard is never reached\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "longrope_convert", "eval", str(checkpoint), "--lengths", "1024", "--data", f"{books}:train",
                           "--documents", "2", "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    perplexity = json.loads(done.stdout)["perplexity"]
    assert perplexity["documents"] == [f"{books}:2", f"{books}:3"] and perplexity["skipped_documents"] == 2
    assert "perplexity: 2 documents of 1,024 tokens (2 shorter or empty ones skipped)" in done.stderr


def test_fewer_long_documents_than_asked_give_consecutive_windows(tmp_path, tokenizer):
    """With windows (the search's --data), documents of at least the length come first as ever, then the long ones'
    next windows in turn (every second window, then every third): consecutive text, each after BOS."""
    (tmp_path / "books.jsonl").write_text("".join(json.dumps({"text": text}) + "\n"
                                                  for text in (BOOK, "too short", BOOK[:3300])))
    books = f"{tmp_path / 'books.jsonl'}"
    whole = tokenizer(BOOK, add_special_tokens=False)["input_ids"]
    third = tokenizer(BOOK[:3300], add_special_tokens=False)["input_ids"]
    length = 512
    assert len(third) // (length - 1) == 2 and len(whole) // (length - 1) >= 6
    ids, names, skipped = tokenized_documents(tokenizer, read_documents([books]), length, limit=6, windows=True)
    assert names == [f"{books}:1", f"{books}:3", f"{books}:1#window2", f"{books}:3#window2", f"{books}:1#window3",
                     f"{books}:1#window4"] and skipped == 1
    assert all(i.shape == (1, length) and i[0, 0] == tokenizer.bos_token_id for i in ids)
    assert ids[2][0, 1:].tolist() == whole[length - 1 : 2 * (length - 1)]
    assert ids[5][0, 1:].tolist() == whole[3 * (length - 1) : 4 * (length - 1)]
    assert ids[3][0, 1:].tolist() == third[length - 1 : 2 * (length - 1)]
    plain, plain_names, _ = tokenized_documents(tokenizer, read_documents([books]), length, limit=6)
    assert plain_names == names[:2] and all(torch.equal(a, b) for a, b in zip(plain, ids))
    enough, enough_names, _ = tokenized_documents(tokenizer, read_documents([books]), length, limit=2, windows=True)
    assert enough_names == names[:2]  # enough documents: no windows


def test_data_is_recorded_by_name_and_content_never_by_a_path(tmp_path, monkeypatch):
    """What a factor file records of --data (documents.data_provenance) and the names of its documents
    (portable_document_name): names and SHA-256s of contents, not where the files lay on this machine."""
    import hashlib

    from longrope_convert.documents import data_provenance, portable_document_name

    (tmp_path / "corpus" / "books" / "more").mkdir(parents=True)
    (tmp_path / "corpus" / "books" / "a.txt").write_text("one")
    (tmp_path / "corpus" / "books" / "more" / "b.jsonl").write_text('{"text": "two"}\n')
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    book, books = "../corpus/books/a.txt", "../corpus/books"
    records = data_provenance([book, books, "pg19:test", f"{books}:train"])
    a_sha = hashlib.sha256(b"one").hexdigest()
    assert records[0] == {"name": "a.txt", "sha256": a_sha}
    assert records[1]["name"] == "books" and records[1]["files"] == 2 and len(records[1]["sha256"]) == 64
    assert records[2:] == [{"dataset": "pg19:test"}, {"dataset": "books:train"}]
    assert "corpus" not in json.dumps(records) and str(tmp_path) not in json.dumps(records)
    (tmp_path / "corpus" / "books" / "a.txt").write_text("one!")  # another content, another hash
    assert data_provenance([book])[0]["sha256"] != a_sha and data_provenance([books])[0] != records[1]
    names = [document.name for document in read_documents([books])]
    assert [portable_document_name(name, ["pg19", books]) for name in names] == ["books/a.txt", "books/more/b.jsonl:1"]
    assert portable_document_name("../corpus/books/a.txt#window2", [book]) == "a.txt#window2"
    assert portable_document_name("../corpus/books:7#window2", [f"{books}:train"]) == "books:7#window2"
    assert portable_document_name("pg19:3", ["pg19:test"]) == "pg19:3"


@pytest.mark.parametrize("hub", ["refuses connections", "accepts and never answers"])
def test_an_unreachable_hub_is_detected_once_before_datasets_retries(hub, tmp_path):
    """`eval --data pg19` with the Hub's endpoint on 127.0.0.1 refusing connections, or accepting them and never
    answering: one request (one connection), then one line naming the endpoint; none of `datasets`' retries."""
    import socket

    source = read_source(TESTBED)
    checkpoint = write_checkpoint(source, analytic_factor_set("pi", source.fingerprint, 1024), tmp_path / "tiny-1k",
                                  "init:pi").output
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if hub == "refuses connections":
        server.close()
    else:
        server.listen(8)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "longrope_convert", "eval", str(checkpoint), "--lengths", "512",
                           "--data", "pg19"], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Retry" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (f"error: data 'pg19': cannot reach http://127.0.0.1:{port} to get 'pg19' "
                                            "(no network?); with a cached copy, set HF_HUB_OFFLINE=1 to use it")
    if hub == "accepts and never answers":
        server.settimeout(0)
        connections = []
        while True:
            try:
                connections.append(server.accept()[0])
            except BlockingIOError:
                break
        assert len(connections) == 1  # detected once
        for connection in connections:
            connection.close()
        server.close()
