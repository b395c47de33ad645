"""Rows without usable text are counted by reason, the same way by the in-process miner
and by the Ray miners' UDF (run here without Ray), and tokens left short are named."""

import json
import logging

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from tests.helpers import SENTENCES, WORDS
from tokdist_ray.config import FileDataSource
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.data.corpus.corpus_parts import Piece, read_part
from tokdist_ray.data.corpus.files import resolve_files
from tokdist_ray.data.corpus.ray_corpus import PART
from tokdist_ray.data.mining.local_mining import mine_snippets
from tokdist_ray.data.mining.miner import TALLY, SnippetMiner, TokenizerSpec
from tokdist_ray.data.snippets import MiningStats
from tokdist_ray.vocab.merges import expand_with_merges

BAD_LINES = [b'{"text": null}', b'{"other": "x"}', b'{"text": 5}', b'{"text": ""}', b'{"text": "  "}', b"not json"]
EXPECTED = {"missing_text": 2, "not_a_string": 1, "empty": 2, "invalid_json": 1, "binary_file": 1}


@pytest.fixture
def bad_corpus(tmp_path):
    lines = [json.dumps({"text": s}).encode() for s in SENTENCES] + BAD_LINES
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "blob.dat").write_bytes(b"\x7fELF\x02\x01\x00\x00" + bytes(range(256)))
    return tmp_path


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


def test_both_miners_count_bad_rows_by_reason(bad_corpus, tokenizer):
    expansion = expand_with_merges(tokenizer, WORDS)
    _, stats = mine_snippets(documents(FileDataSource(str(bad_corpus))), expansion, 12, 100)
    assert (stats.documents, stats.bad_rows, stats.bad_reasons) == (len(SENTENCES), 7, EXPECTED)
    assert stats.as_dict(100)["bad_rows_by_reason"] == EXPECTED
    assert "7 bad rows skipped (1 binary file, 2 empty, 1 invalid json, 2 missing text, 1 not a string)" in stats.summary()

    files = resolve_files(str(bad_corpus))  # the Ray read task's blocks, through the miners' UDF
    part = [Piece(path, size) for path, size in zip(files.paths, files.sizes)]
    miner = SnippetMiner(TokenizerSpec.of(expansion.tokenizer), [t.text for t in expansion.tokens], expansion.new_start, 12, 100)
    tallies = [row for block in read_part(files.filesystem, part, "text")
               for row in miner(block.append_column(PART, pa.array([0] * block.num_rows, pa.int64()))).to_pylist()
               if row["token_index"] == TALLY]
    ray_stats = MiningStats()
    for tally in tallies:
        for reason, n in json.loads(tally["bad_reasons"]).items():
            ray_stats.add_bad(reason, n)
    assert ray_stats.bad_reasons == EXPECTED and sum(t["bad_rows"] for t in tallies) == 7
    assert sum(t["documents"] for t in tallies) == len(SENTENCES)


def test_tokens_left_short_are_named_with_the_top_up_option(caplog):
    stats = MiningStats(counts={" Krankenwagen": 4, " Schmetterling": 1, " distillation": 0})
    with caplog.at_level(logging.INFO, logger="tokdist_ray"):
        stats.log_shortfall(4)
        stats.log_shortfall(4, top_up=True)
    warning, news = caplog.records
    assert warning.levelno == logging.WARNING and news.levelno == logging.INFO
    assert "2 of 3 tokens short of 4 snippets (' Schmetterling' 1, ' distillation' 0)" in warning.getMessage()
    assert "data.top_up_with_generation: true" in warning.getMessage()
    assert "top_up_with_generation=True" in warning.getMessage()
    assert "topping them up with generated snippets" in news.getMessage()
    assert MiningStats(counts={" a": 4}).shortfall_note(4) is None
