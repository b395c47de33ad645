"""Corpus mining at scale: region tokenisation equals whole-document tokenisation on the
real Python docs with SmolLM2's tokenizer; the Ray Data pipeline equals the in-process
miner; quotas, early stop, determinism, bad rows, an HF `datasets` source from local
files, the result cache, and a run on a two-node Ray cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.data.corpus.corpus_parts import corpus_parts, read_part, text_blocks
from tokdist_ray.data.corpus.files import file_kind, resolve_files
from tokdist_ray.data.corpus.sources import corpus_reader
from tokdist_ray.data.mining import matching
from tokdist_ray.data.mining.local_mining import mine_snippets
from tokdist_ray.data.mining.matching import CUT_PROBE, Cuts, TokenScanner, _runs
from tokdist_ray.data.mining.miner import TALLY, SnippetMiner, TokenizerSpec
from tokdist_ray.data.mining.mining import mine_corpus, mining_dataset, reads_fused
from tokdist_ray.data.mining.mining_cache import cache_key
from tokdist_ray.data.mining.quota import QuotaLedger
from tokdist_ray.data.snippets import SNIPPET_SCHEMA, bos_prefix, settle, window_around
from tokdist_ray.vocab.bpe_training import continue_bpe, pre_token_counts
from tokdist_ray.vocab.merges import ADDED_TOKENS, SPANS_PRE_TOKENS, MergeExpansion, expand_with_merges
from tokdist_ray.vocab.models import load_tokenizer
from tokdist_ray.vocab.tokens import NewToken, phrase_ids

REPO_ROOT = Path(__file__).resolve().parents[2]
# Phrases across pre-tokens, one overlapping the next (" is not" / " not None").
MULTI_WORD = [" is not", " not None", " for example", "::\n\n"]
EVERYTHING = 10**6  # a quota no token reaches: mine every distinct window


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="module")
def doc_texts(docs_corpus) -> list[str]:
    """Every third file of the Python docs (about 170 files, 3.4 MB)."""
    files = sorted(docs_corpus.rglob("*.txt"))[::3]
    return [f.read_text(encoding="utf-8") for f in files]


def fragmented_words(tokenizer, texts, every: int = 25) -> list[str]:
    """Words SmolLM2 splits, taken at evenly spaced frequency ranks."""
    counts = Counter(re.findall(r" [A-Za-z_]{6,}", "\n".join(texts)))
    return [w for w, _ in counts.most_common() if len(phrase_ids(tokenizer, w)) > 1][::every]


@pytest.fixture(scope="module")
def doc_expansion(smol_tokenizer, doc_texts) -> MergeExpansion:
    """Merges for the fragmented words (their intermediates too); the multi-word phrases
    span pre-tokens, so merges cannot produce them."""
    expansion = expand_with_merges(smol_tokenizer, fragmented_words(smol_tokenizer, doc_texts) + MULTI_WORD)
    assert {s["token"] for s in expansion.skipped if s["reason"] == SPANS_PRE_TOKENS} >= set(MULTI_WORD[:3])
    return expansion


@pytest.fixture(scope="module")
def phrase_expansion(smol_tokenizer, doc_texts) -> MergeExpansion:
    """Added tokens (the reference's mode), which may span pre-tokens and overlap."""
    return expand_with_merges(smol_tokenizer, fragmented_words(smol_tokenizer, doc_texts, every=50) + MULTI_WORD, mode=ADDED_TOKENS)


def whole_document_windows(expansion, texts, snippet_len):
    """Every new id in each document's whole expanded tokenisation, with its window,
    trimmed where its text would not encode back to it."""
    backend = expansion.tokenizer.backend_tokenizer
    return [
        (doc, token_id - expansion.new_start, *settled)
        for doc, e in enumerate(backend.encode_batch(texts, add_special_tokens=False))
        for start, token_id in enumerate(e.ids)
        if token_id >= expansion.new_start and (settled := settle(backend, *window_around(e.ids, start, 1, snippet_len)))
    ]


def scanner_for(expansion, snippet_len, tokenizer=None) -> TokenScanner:
    return TokenScanner(tokenizer or expansion.tokenizer.backend_tokenizer, [t.text for t in expansion.tokens],
                        expansion.new_start, snippet_len)


# ---------------------------------------------------------------------- matching
@pytest.mark.parametrize("snippet_len", [12, 50, 200])
def test_region_tokenisation_finds_the_windows_of_whole_document_tokenisation(doc_texts, doc_expansion, snippet_len):
    scanner = scanner_for(doc_expansion, snippet_len)
    hits = scanner.scan(doc_texts, range(len(doc_expansion.tokens)))
    expected = whole_document_windows(doc_expansion, doc_texts, snippet_len)
    assert [(h.doc, h.token_index, h.window, h.token_position) for h in hits] == expected
    assert scanner.regions and scanner.tokenised_chars < 0.7 * sum(map(len, doc_texts))
    assert len({h.token_index for h in hits}) > 20
    backend = doc_expansion.tokenizer.backend_tokenizer  # every window is what its own text encodes to
    assert all(backend.encode(backend.decode(h.window), add_special_tokens=False).ids == h.window for h in hits)


def test_added_tokens_across_pre_tokens_are_found_as_the_tokenizer_emits_them(doc_texts, phrase_expansion):
    scanner = scanner_for(phrase_expansion, 24)
    hits = scanner.scan(doc_texts, range(len(phrase_expansion.tokens)))
    assert [(h.doc, h.token_index, h.window, h.token_position) for h in hits] == whole_document_windows(
        phrase_expansion, doc_texts, 24)
    found = {phrase_expansion.tokens[h.token_index].text for h in hits}
    assert {" is not", "::\n\n"} <= found


def test_only_open_tokens_are_reported_but_full_ones_still_take_their_place(smol_tokenizer):
    expansion = expand_with_merges(smol_tokenizer, [" is not", " not None"], mode=ADDED_TOKENS)
    scanner = scanner_for(expansion, 8)
    text = "When x is not None, y is not set and z is not None."
    assert [h.token_index for h in scanner.scan([text], [0, 1])] == [0, 0, 0]  # " is not" is matched first
    assert scanner.scan([text], [1]) == []  # " not None" never occurs once " is not" took its place


def test_tokenizers_that_change_text_are_scanned_whole(doc_texts, doc_expansion):
    from tokenizers import Tokenizer, normalizers

    tokenizer = Tokenizer.from_str(doc_expansion.tokenizer.backend_tokenizer.to_str())
    tokenizer.normalizer = normalizers.NFC()  # ids no longer spell the text byte for byte, in general
    scanner = scanner_for(doc_expansion, 30, tokenizer)
    hits = scanner.scan(doc_texts[:20], range(len(doc_expansion.tokens)))
    assert not scanner.regions
    expected = whole_document_windows(doc_expansion, doc_texts[:20], 30)
    assert [(h.doc, h.token_index, h.window, h.token_position) for h in hits] == expected


def test_cut_rules_are_kept_only_where_they_keep_the_ids(smol_tokenizer):
    from tokenizers import Tokenizer, pre_tokenizers

    assert Cuts.safe_for(smol_tokenizer.backend_tokenizer).chars == (" ", "\n")
    prefixing = Tokenizer.from_str(smol_tokenizer.backend_tokenizer.to_str())
    prefixing.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # "\nx" alone becomes " \nx"
    assert Cuts.safe_for(prefixing).chars == (" ",)
    cuts = Cuts((" ", "\n"))
    text = "ab cd  ef\ngh.\nij"
    assert [p for p in range(len(text)) if cuts.is_cut(text, p)] == [2, 9]
    assert (cuts.before(text, 8), cuts.after(text, 3), cuts.after(text, 10)) == (2, 9, len(text))


@pytest.fixture(scope="module")
def learned_expansion(smol_tokenizer, doc_texts) -> MergeExpansion:
    """400 tokens continued BPE learns on the docs: frequent, often inside words, so that
    nearly every word is a candidate (as with thousands of tokens on a large corpus)."""
    learned = continue_bpe(smol_tokenizer, pre_token_counts(smol_tokenizer, doc_texts), 400)
    return expand_with_merges(smol_tokenizer, [t.text for t in learned])


def test_frequent_tokens_give_the_windows_of_whole_document_tokenisation_mostly_unsettled(
    doc_texts, learned_expansion, monkeypatch
):
    encoded_again = []
    monkeypatch.setattr(matching, "settle", lambda *a: encoded_again.append(a) or settle(*a))
    docs = doc_texts[:30]
    hits = scanner_for(learned_expansion, 32).scan(docs, range(len(learned_expansion.tokens)))
    assert [(h.doc, h.token_index, h.window, h.token_position) for h in hits] == whole_document_windows(
        learned_expansion, docs, 32)
    assert len(hits) > 2000 and len(encoded_again) < len(hits) / 4  # the rest known from their ends


def test_a_quota_keeps_each_tokens_first_distinct_windows(doc_texts, learned_expansion):
    docs, every_token = doc_texts[:30], range(len(learned_expansion.tokens))
    taken, expected = defaultdict(list), []
    for hit in scanner_for(learned_expansion, 32).scan(docs, every_token):
        if len(taken[hit.token_index]) < 3 and hit.window not in taken[hit.token_index]:
            taken[hit.token_index].append(hit.window)
            expected.append(hit)
    assert scanner_for(learned_expansion, 32).scan(docs, every_token, quota=3) == expected
    assert len(expected) < 3 * len(learned_expansion.tokens)


def test_a_scanner_whose_tokens_filled_finds_what_a_new_one_does(doc_texts, learned_expansion):
    docs, n = doc_texts[:20], len(learned_expansion.tokens)
    scanner = scanner_for(learned_expansion, 32)
    # all open; most still open (its automaton kept, full tokens' matches filtered);
    # a quarter (rebuilt); tokens it no longer holds (rebuilt)
    for open_set in (range(n), range(n // 4, n), range(0, n, 4), range(n // 2)):
        assert scanner.scan(docs, open_set) == scanner_for(learned_expansion, 32).scan(docs, open_set)


def test_a_window_is_known_to_encode_back_only_where_it_does(smol_tokenizer, doc_texts):
    backend, cuts = smol_tokenizer.backend_tokenizer, Cuts((" ", "\n"))
    text = CUT_PROBE + "\n" + doc_texts[0][:3000]
    encoding = backend.encode(text, add_special_tokens=False)
    ids = encoding.ids
    verdicts = []
    for first in range(len(ids)):
        for end in {min(first + k, len(ids)) for k in (1, 7, 30)}:
            window = ids[first:end]
            lo, hi = encoding.token_to_chars(first)[0], encoding.token_to_chars(end)[0] if end < len(ids) else len(text)
            exact = backend.encode(backend.decode(window), add_special_tokens=False).ids == window
            verdicts.append((cuts.encodes_back(backend, text, window, lo, hi), exact))
    assert all(exact for known, exact in verdicts if known)
    assert sum(known for known, _ in verdicts) > 0.8 * sum(exact for _, exact in verdicts)
    assert not all(exact for _, exact in verdicts)  # the text has windows that do not encode back


def test_candidates_run_together_where_their_margins_overlap():
    spans = [(0, 3), (5, 8), (6, 20), (25, 27), (40, 41)]
    assert list(_runs(spans, margin=2)) == [([0, 5, 6], 20), ([25], 27), ([40], 41)]
    assert list(_runs([], margin=2)) == []


# ---------------------------------------------------------------------- pieces
def test_ledger_takes_the_first_distinct_snippets_in_stream_order():
    tokens = [NewToken(" a", (1, 2)), NewToken(" b", (3, 4))]
    ledger = QuotaLedger(tokens, quota=2, new_start=100)
    offers = [(0, [9, 1, 2]), (0, [9, 1, 2]), (1, [3, 4]), (0, [1, 2, 7]), (0, [1, 2, 8])]
    assert [ledger.offer(i, ids, 1) for i, ids in offers] == [[], [], [], [0], []]
    assert ledger.counts() == {" a": 2, " b": 1} and ledger.open == 1
    assert [r["input_ids"] for r in ledger.taken() if r["token_index"] == 0] == [[9, 1, 2], [1, 2, 7]]
    assert ledger.table().schema == SNIPPET_SCHEMA


# ids 100, 101, 102 are the new tokens " a", " b", " c"
BYSTANDER_OFFERS = [(0, [9, 100, 101]), (1, [9, 101, 5]), (1, [101, 7]), (0, [9, 100, 101]),
                    (0, [100, 102, 102]), (2, [100, 102, 102]), (2, [102, 8]), (2, [102, 6])]


def test_a_snippet_counts_toward_every_new_token_it_holds():
    tokens = [NewToken(" a", (1, 2)), NewToken(" b", (3, 4)), NewToken(" c", (5, 6))]
    ledger = QuotaLedger(tokens, quota=2, new_start=100)
    filled = [ledger.offer(i, ids, 1) for i, ids in BYSTANDER_OFFERS]
    # " b" fills with its first own snippet, having counted " a"'s; " c" counts a snippet
    # once however often it occurs there, and not again when offered it as its own
    assert filled == [[], [1], [], [], [0], [], [2], []]
    assert ledger.counts() == {" a": 2, " b": 2, " c": 2} and ledger.open == 0
    assert [(r["token"], r["input_ids"]) for r in ledger.taken()] == [  # grouped by main token
        (" a", [9, 100, 101]), (" a", [100, 102, 102]), (" b", [9, 101, 5]), (" c", [102, 8])]

    main_only = QuotaLedger(tokens, quota=2, new_start=100, count_bystanders=False)
    assert [main_only.offer(i, ids, 1) for i, ids in BYSTANDER_OFFERS] == [[], [], [1], [], [0], [], [2], []]
    assert main_only.counts() == {" a": 2, " b": 2, " c": 2}
    assert main_only.table().num_rows == 6 > ledger.table().num_rows == 4


def test_each_token_fills_to_its_own_quota():
    tokens = [NewToken(" a", (1, 2)), NewToken(" b", (3, 4)), NewToken(" c", (5, 6))]
    ledger = QuotaLedger(tokens, quota=[1, 3, 0], new_start=100)
    assert ledger.open == 2  # a token with no budget is never wanted
    assert [ledger.offer(i, ids, 1) for i, ids in BYSTANDER_OFFERS] == [[0], [], [1], [], [], [], [], []]
    assert ledger.counts() == {" a": 1, " b": 3, " c": 0} and ledger.open == 0
    with pytest.raises(ValueError, match="2 quotas for 3 tokens"):
        QuotaLedger(tokens, quota=[1, 2], new_start=100)


def test_each_token_is_mined_to_its_own_quota(frequent_tokens, docs_corpus, tmp_path):
    texts = [t.text for t in frequent_tokens.tokens]
    quota = dict(zip(texts, [1, 5] * len(texts)))
    source = FileDataSource(str(docs_corpus))

    def mine(q, count_bystanders=True):
        return mine_corpus(source, frequent_tokens, 32, q, out_dir=str(tmp_path), in_process=True,
                           count_bystanders=count_bystanders)

    spread = mine(quota)
    assert spread.stats.counts == quota and spread.shortfall == {}
    # counting main tokens only, each token's snippets are the first of a uniform run's
    own, uniform = mine(quota, False).table(), mine(5, False).table()

    def of(table, i):
        return table.filter(pc.equal(table["token_index"], i))["input_ids"].to_pylist()

    assert all(of(own, i) == of(uniform, i)[:quota[t]] for i, t in enumerate(texts))
    assert own.num_rows == sum(quota.values())


def test_a_miner_drops_a_token_it_filled_itself_but_only_for_later_parts(smol_tokenizer):
    expansion = expand_with_merges(smol_tokenizer, [" tokenizers", " pretrained"])
    miner = SnippetMiner(TokenizerSpec.of(expansion.tokenizer), [t.text for t in expansion.tokens],
                         expansion.new_start, snippet_len=8, quota=2)

    def mined(part: int, words: str) -> Counter:
        docs = [f"Note {part}.{i}: {words} and {i * 7} more." for i in range(3)]  # distinct windows
        table = miner(pa.table({"text": docs, "bad": [None] * len(docs), "part": [part] * len(docs)}))
        return Counter(i for i in table.column("token_index").to_pylist() if i != TALLY)

    assert mined(5, "the tokenizers") == {0: 2}  # two distinct windows: full after part 5
    assert mined(3, "the tokenizers") == {0: 2}  # an earlier part (a retried task): still wanted
    assert mined(6, "the tokenizers or pretrained") == {1: 2}  # a later part: no longer
    assert mined(5, "the tokenizers") == {0: 2}  # part 5 itself is kept: its windows may come first


def test_files_resolve_from_paths_globs_and_uris(tmp_path):
    for name in ("a.jsonl", "b.txt.gz", "sub/c.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    local = resolve_files(str(tmp_path))
    assert [Path(p).name for p in local.paths] == ["a.jsonl", "b.txt.gz", "c.parquet"]
    by_uri = resolve_files(f"file://{tmp_path}/*.jsonl")
    assert [Path(p).name for p in by_uri.paths] == ["a.jsonl"] and by_uri.sizes == [1]
    assert [file_kind(p) for p in local.paths] == ["jsonl", "text", "parquet"]
    with pytest.raises(FileNotFoundError):
        resolve_files(f"file://{tmp_path}/*.nothing")
    blocks = list(text_blocks(["aaaa", None, "bb", "cccccc"], max_bytes=5))
    assert [b.column("text").to_pylist() for b in blocks] == [["aaaa", None, "bb"], ["cccccc"]]


def test_cache_key_follows_corpus_tokenizer_tokens_and_settings(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    (tmp_path / "doc.txt").write_text("text")
    source = FileDataSource(str(tmp_path))
    spec = TokenizerSpec.of(AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True)))
    tokens = [NewToken(" ab", (5, 6))]
    settings = {"snippet_len": 8, "snippets_per_token": 4, "seed": 0}

    def key(spec=spec, tokens=tokens, settings=settings, corpus=None):
        return cache_key(corpus or corpus_reader(source).spec(), spec, tokens, settings)

    first = key()
    assert first == key(settings=dict(settings))
    assert first != key(spec=TokenizerSpec.of(AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=False))))
    assert first != key(tokens=[NewToken(" ab", (5, 7))])
    assert first != key(settings={**settings, "seed": 1})
    (tmp_path / "doc.txt").write_text("longer text")
    assert first != key()

    def hf(fn):
        return corpus_reader(HFDataSource("json", data_files=["a.jsonl"], map_to_text_fn=fn)).spec()

    assert key(corpus=hf(lambda row: row)) != key(corpus=hf(lambda row: {"text": row["body"]}))


@pytest.mark.parametrize("part_bytes", [1, 37, 200, 10**6])
def test_large_files_are_read_in_slices_that_give_each_row_once_in_order(tmp_path, part_bytes):
    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 13)}) for i in range(40)] + BAD_JSON_LINES + ["", "  "]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = [f"row {i} " * (i % 5 + 1) for i in range(50)] + [None]
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet", row_group_size=7)
    (tmp_path / "c.txt").write_text("one document\n" * 20)
    files = resolve_files(str(tmp_path))

    def values(parts):
        return [v for part in parts for block in read_part(files.filesystem, part, "text")
                for v in block.column("text").to_pylist()]

    whole = corpus_parts(files, seed=3, part_bytes=10**9, split=False)
    sliced = corpus_parts(files, seed=3, part_bytes=part_bytes, split=True)
    assert values(sliced) == values(whole)
    assert len(values(whole)) == 40 + len(BAD_JSON_LINES) + 51 + 1  # blank lines are no rows
    if part_bytes < 100:  # both large files cut, the text file whole
        assert sum(p.byte_range is not None for part in sliced for p in part) > 1
        assert sum(p.row_groups is not None for part in sliced for p in part) == 8  # ceil(51 / 7) row groups
        assert sum(p.path.endswith("c.txt") for part in sliced for p in part) == 1


# ---------------------------------------------------------------------- on Ray
def test_local_files_are_read_inside_the_miners_and_others_in_tasks_of_their_own(ray_session, tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    args = {"tokenizer": None, "texts": [], "phrases": [], "snippet_len": 8, "quota": 1}
    assert reads_fused(mining_dataset(corpus_reader(FileDataSource(str(tmp_path))), 0, args, 2))
    assert not reads_fused(mining_dataset(corpus_reader(FileDataSource(str(tmp_path), max_docs=5)), 0, args, 2))


BAD_JSON_LINES = ['{"text": null}', '{"text": 5}', '{"other": "x"}', '{"text": ""}', "not json", '{"text": "   "}']


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, doc_texts):
    """40 docs as text files, JSONL and parquet, plus 9 bad rows; and the good texts."""
    root = tmp_path_factory.mktemp("mixed-corpus")
    texts = doc_texts[:40]
    for i, text in enumerate(texts[:20]):
        (root / f"doc{i:02d}.rst.txt").write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": t}) for t in texts[20:30]] + BAD_JSON_LINES
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": texts[30:] + [None]}), root / "docs.parquet")
    (root / "empty.txt").write_text("")
    (root / "blob.bin").write_bytes(b"\x7fELF\x02\x01\x00\x00" + bytes(range(256)))  # binary: skipped, counted
    return root, texts


def snippet_sets(rows) -> dict[str, set]:
    sets = defaultdict(set)
    for row in rows:
        sets[row["token"]].add((tuple(row["input_ids"]), row["token_position"]))
    return dict(sets)


def test_ray_mining_equals_the_in_process_miner_counts_bad_rows_and_is_cached(
    ray_session, smol_tokenizer, mixed_corpus, doc_expansion, tmp_path
):
    root, texts = mixed_corpus
    source = FileDataSource(f"file://{root}/*")  # a glob through a pyarrow filesystem
    result = mine_corpus(source, doc_expansion, 24, EVERYTHING, out_dir=str(tmp_path))

    reference, in_process = mine_snippets(documents(FileDataSource(str(root))), doc_expansion, 24, EVERYTHING)
    assert snippet_sets(result.table().to_pylist()) == snippet_sets(reference)
    assert result.stats.documents == len(texts)
    assert result.stats.bad_rows == len(BAD_JSON_LINES) + 3  # the parquet null, the empty file, the binary one
    expected = {"missing_text": 3, "not_a_string": 1, "invalid_json": 1, "empty": 3, "binary_file": 1}
    assert result.stats.bad_reasons == in_process.bad_reasons == expected
    assert result.stats.bytes == sum(len(t.encode()) for t in texts)
    assert result.shortfall == {t.text: EVERYTHING - result.stats.counts[t.text] for t in doc_expansion.tokens}
    report = result.report()
    assert report["documents"] == len(texts) and report["megabytes_per_second"] > 0
    assert report["snippets_per_token"] == result.stats.counts

    table = pq.read_table(result.snippets_path)
    assert table.schema == SNIPPET_SCHEMA and set(table.column("source").to_pylist()) == {"corpus"}
    prefix = bos_prefix(smol_tokenizer)
    assert all(row["input_ids"][: len(prefix)] == prefix for row in table.to_pylist())

    again = mine_corpus(source, doc_expansion, 24, EVERYTHING, out_dir=str(tmp_path))
    assert again.cached and again.snippets_path == result.snippets_path
    assert again.stats.counts == result.stats.counts and again.stats.bad_rows == result.stats.bad_rows

    capped = FileDataSource(f"file://{root}/*", max_docs=12)  # rows, bad ones included
    stats = mine_corpus(capped, doc_expansion, 24, EVERYTHING, out_dir=str(tmp_path)).stats
    assert stats.documents + stats.bad_rows == 12


@pytest.fixture(scope="module")
def frequent_tokens(smol_tokenizer, doc_texts) -> MergeExpansion:
    """Eight fragmented words found in many documents."""
    return expand_with_merges(smol_tokenizer, fragmented_words(smol_tokenizer, doc_texts, every=1)[:8])


def test_quotas_stop_reading_early_and_the_sample_depends_on_the_seed_only(
    ray_session, smol_tokenizer, docs_corpus, frequent_tokens, tmp_path
):
    source = FileDataSource(str(docs_corpus))
    total = len(list(docs_corpus.rglob("*.txt")))

    def mine(seed, workers, name):
        result = mine_corpus(source, frequent_tokens, 32, 3, out_dir=str(tmp_path / name),
                             seed=seed, num_workers=workers)
        return result, pq.read_table(result.snippets_path)

    one, one_table = mine(0, 1, "one")
    two, two_table = mine(0, 2, "two")
    other, other_table = mine(1, 2, "other")
    alone = mine_corpus(source, frequent_tokens, 32, 3, out_dir=str(tmp_path / "alone"), seed=0, in_process=True)
    for result in (one, two, other, alone):
        assert set(result.stats.counts.values()) == {3} and result.shortfall == {}
        assert result.stats.documents < total / 2  # stopped once every token had its 3
    assert one_table.equals(two_table)  # whatever the number of miners
    assert alone.table().equals(one_table) and alone.stats.documents == one.stats.documents  # or without Ray
    assert not one_table.equals(other_table)  # another seed, another sample of the corpus
    assert one_table.column("token_index").to_pylist() == sorted(one_table.column("token_index").to_pylist())


def test_hf_dataset_from_local_files(ray_session, doc_texts, doc_expansion, tmp_path):
    texts = doc_texts[40:70]
    files = []
    for shard in range(2):  # two shards, so two read tasks
        path = tmp_path / f"part{shard}.jsonl"
        path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts[shard::2])))
        files.append(str(path))

    def body(row):
        return {"text": row["body"]}

    source = HFDataSource("json", split="train", data_files=files, map_to_text_fn=body, max_docs=None)
    result = mine_corpus(source, doc_expansion, 24, EVERYTHING, out_dir=str(tmp_path / "out"))
    reference, _ = mine_snippets(documents(source), doc_expansion, 24, EVERYTHING)
    assert snippet_sets(result.table().to_pylist()) == snippet_sets(reference)
    assert result.stats.documents == len(texts) and result.stats.bad_rows == 0


CLUSTER_RUN = """
import json, sys
import ray
import ray.data
from ray.cluster_utils import Cluster
from tokdist_ray.config import FileDataSource
from tokdist_ray.data.mining.mining import mine_corpus
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_tokenizer

corpus, model, out, words = sys.argv[1:5]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
cluster.add_node(num_cpus=2)
try:
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    # Ray Data starts a pool's actors without waiting for them all: on a fast machine the
    # first miner up could read the whole small corpus before the other node's started
    ray.data.DataContext.get_current().wait_for_min_actors_s = 120
    expansion = expand_with_merges(load_tokenizer(model), json.loads(words))
    result = mine_corpus(FileDataSource(corpus), expansion, 24, 10**6, out_dir=out, num_workers=2)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("RESULT " + json.dumps({"nodes": result.work.nodes, "alive": alive, "counts": result.stats.counts,
                                 "documents": result.stats.documents, "requested": [t.text for t in expansion.requested]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_node_cluster_mines_on_both_nodes(smollm2_dir, docs_corpus, doc_texts, smol_tokenizer, tmp_path):
    """A cluster of two 2-CPU nodes, started in a child process so that it does not meet
    the test session's own Ray instance. Every document is read (no token fills up), so
    both miners get batches."""
    words = fragmented_words(smol_tokenizer, doc_texts, every=1)[:6]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [str(docs_corpus), str(smollm2_dir), str(tmp_path), json.dumps(words)]
    run = subprocess.run([sys.executable, "-c", CLUSTER_RUN, *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")))

    assert len(result["alive"]) == 2 and set(result["nodes"]) == set(result["alive"])
    assert all(docs > 0 for docs in result["nodes"].values())
    assert result["documents"] == len(list(docs_corpus.rglob("*.txt")))
    assert len(result["requested"]) >= 4 and all(result["counts"][w] > 0 for w in result["requested"])


def test_the_api_and_the_job_mine_the_same_snippets_with_or_without_ray(ray_session, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """One mining rule: the API on a running Ray cluster, the API in process, and the
    job's snippets stage take the same snippets from the same corpus with the same seed."""
    from tests.helpers import SENTENCES, WORDS
    from tokdist_ray import DistillationConfig, TokenDistillation, api
    from tokdist_ray.job.config import DataConfig, JobConfig, SnippetsConfig, TokensConfig
    from tokdist_ray.job.stages import gather_snippets

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, sentence in enumerate(SENTENCES * 3):  # many files, each token in several: the read order matters
        (corpus / f"{i}.txt").write_text(sentence)
    mined = []
    monkeypatch.setattr(api, "mine_corpus", lambda *a, **k: mined.append((k["in_process"], mine_corpus(*a, **k))) or mined[-1][1])
    tokdist = TokenDistillation(str(tiny_model_dir()), device="cpu")
    reports = []
    for ray_runs in (True, False):
        monkeypatch.setattr(api, "ray_is_running", lambda: ray_runs)
        monkeypatch.setenv("TOKDIST_RAY_CACHE", str(tmp_path / f"cache-{ray_runs}"))  # no cache shared
        tokdist.run(WORDS, data=FileDataSource(str(corpus)), snippet_len=12, snippets_per_token=2,
                    training=DistillationConfig(max_steps=1))
        reports.append(tokdist.last_report)
    (_, on_ray), (_, alone) = mined
    assert [in_process for in_process, _ in mined] == [False, True] and alone.work.workers == 1
    assert on_ray.table().equals(alone.table()) and reports[0]["tokens_added"] == reports[1]["tokens_added"]

    config = JobConfig(model=str(tiny_model_dir()), run_dir=str(tmp_path / "job"), tokens=TokensConfig(list=WORDS),
                       data=DataConfig(corpus=FileDataSource(paths=[str(corpus)])), snippets=SnippetsConfig(snippet_len=12, snippets_per_token=2))
    job = gather_snippets(config.validate(), expand_with_merges(tokdist.tokenizer, WORDS), tmp_path / "job")
    assert pq.read_table(job["snippets_path"]).equals(alone.table())
