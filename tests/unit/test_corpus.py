"""The one corpus reader: the in-process path reads what the Ray read tasks read
(compressed files, URIs), replaces bytes that are not UTF-8, and counts bad rows by reason."""

import gzip
import json

import pytest

from tests.helpers import SENTENCES, WORDS
from tokdist_ray.config import FileDataSource
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.data.corpus.corpus_parts import Piece, read_part
from tokdist_ray.data.corpus.files import BINARY_FILE, BadRow, resolve_files
from tokdist_ray.data.mining.local_mining import mine_snippets
from tokdist_ray.errors import CorpusNotFoundError
from tokdist_ray.vocab.merges import expand_with_merges

ROWS = [{"text": s} for s in SENTENCES]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def test_compressed_files_and_uris_read_like_plain_local_files(tmp_path):
    write_jsonl(tmp_path / "plain.jsonl", ROWS)
    write_jsonl(tmp_path / "packed.jsonl.gz", ROWS, opener=gzip.open)
    plain = list(documents(FileDataSource(str(tmp_path / "plain.jsonl"))))
    assert plain == SENTENCES
    assert list(documents(FileDataSource(str(tmp_path / "packed.jsonl.gz")))) == plain
    assert list(documents(FileDataSource(f"file://{tmp_path}/packed.jsonl.gz"))) == plain
    files = resolve_files(f"file://{tmp_path}/packed.jsonl.gz")  # what a Ray read task reads
    blocks = read_part(files.filesystem, [Piece(files.paths[0], files.sizes[0])], "text")
    assert [t for b in blocks for t in b["text"].to_pylist()] == plain


def test_bytes_that_are_not_utf8_are_replaced_on_both_paths(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "caf\xe9 au lait"}\n' + json.dumps(ROWS[0]).encode() + b"\n")
    expected = ["caf\ufffd au lait", SENTENCES[0]]
    assert list(documents(FileDataSource(str(path)))) == expected
    files = resolve_files(str(path))
    blocks = list(read_part(files.filesystem, [Piece(files.paths[0], files.sizes[0])], "text"))
    assert [t for b in blocks for t in b["text"].to_pylist()] == expected


def test_binary_files_are_skipped_and_counted(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "doc.txt").write_text(" ".join(SENTENCES), encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
    docs = list(documents(FileDataSource(str(tmp_path))))
    assert docs == [" ".join(SENTENCES), BadRow(BINARY_FILE)]  # sorted paths: doc.txt, image.png
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    rows, stats = mine_snippets(iter(docs), expand_with_merges(tokenizer, WORDS), 16, 2)
    assert rows and stats.documents == 1 and stats.bad_reasons == {BINARY_FILE: 1}
    assert "1 bad rows skipped (1 binary file)" in stats.summary()


def test_a_missing_corpus_path_names_itself(tmp_path):
    with pytest.raises(CorpusNotFoundError, match="no corpus files match .*nowhere"):
        list(documents(FileDataSource(str(tmp_path / "nowhere" / "*.jsonl"))))


def test_files_are_read_in_the_order_the_paths_name_them(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "a.jsonl", ROWS[1:2])
    source = FileDataSource([str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")])
    assert list(documents(source)) == SENTENCES[:2]


def test_tokens_from_corpus_read_bytes_that_are_not_utf8(tiny_tokenizer_dir, tmp_path):
    """The job's tokens.from_corpus goes through the same reader (it crashed on a Latin-1 byte)."""
    from transformers import AutoTokenizer

    from tokdist_ray.job.config import DataConfig, JobConfig, TokensConfig
    from tokdist_ray.job.stages import candidate_tokens

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "A Krankenwagen at the caf\xe9, a Krankenwagen at the station."}\n')
    config = JobConfig(tokens=TokensConfig(from_corpus=1, selection="words"), data=DataConfig(corpus=FileDataSource(paths=[str(path)]))).validate()
    words, counts = candidate_tokens(config, AutoTokenizer.from_pretrained(tiny_tokenizer_dir()))
    assert words == [" Krankenwagen"] and counts == {" Krankenwagen": 2}
