"""Selection by continued BPE training: vocab.bpe_training and data.mining.pre_token_counts."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.helpers import SENTENCES
from tokdist_ray.config import FileDataSource
from tokdist_ray.data.corpus import file_source
from tokdist_ray.data.mining.pre_token_counts import count_pre_tokens
from tokdist_ray.errors import ConfigError
from tokdist_ray.vocab import bpe_training
from tokdist_ray.vocab.bpe_model import apply_merges
from tokdist_ray.vocab.bpe_training import continue_bpe, pre_token_counts
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.pruning import corpus_occurrences
from tokdist_ray.vocab.tokens import phrase_ids

PROSE = [
    "The Krankenwagen stopped at the corner, and the driver opened the back doors.",
    "Every summer the Schmetterling returns to the same garden behind the library.",
    "A careful reader notices how the story returns to the river again and again.",
    "The children counted the boats on the river while their teacher read aloud.",
    "Boats\n=========\n\nA heading underlined the reStructuredText way.",  # runs of one piece: (=, =) overlaps
]
# Digits, whitespace runs and a long word: what plain BPE would merge first here.
TRAPS = [
    "Invoice 12345678 lists 12345678 parts.",
    "if ready:\n        return            done",
    "The Donaudampfschifffahrtsgesellschaft sails.",
]
CORPUS = SENTENCES * 3 + PROSE * 2 + TRAPS * 12
HELD_OUT = [
    "The Krankenwagen returns to the garden, and a Schmetterling sits on the river bank.",
    "Children read the story of the library again while the teacher counted parts.",
]


@dataclass
class Family:
    tokenizer: PreTrainedTokenizerFast
    # Pre-token counts (not from any text) with frequent pairs that may not be learned:
    # across a pre-token boundary, byte-fallback pieces, part of a character, in the vocabulary.
    unemittable: dict[str, int]


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def family(request, tiny_tokenizer_dir) -> Family:
    from tokenizers import SentencePieceBPETokenizer, Tokenizer, decoders

    if request.param == "byte_level":
        definition = json.loads(AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True)).backend_tokenizer.to_str())
        definition["model"]["vocab"]["Ġqzx"] = len(definition["model"]["vocab"])  # an entry no merge builds
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(json.dumps(definition)), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
        # " café" and " 中" as byte-level strings: "é" is learned, no part of "中" (3 bytes) is
        return Family(tokenizer, {"Krankenwagen!!": 40, "ĠcafÃ©": 40, "Ġä¸Ń": 40, "Ġqzx": 40})

    # Llama 2 style: characters outside the alphabet (the newline here too) as byte pieces.
    sentencepiece = SentencePieceBPETokenizer()
    texts = [t.replace("\n", " ") for t in CORPUS + HELD_OUT]
    sentencepiece.train_from_iterator(texts, vocab_size=120, special_tokens=["<unk>"], show_progress=False)
    sentencepiece.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    definition = json.loads(sentencepiece._tokenizer.to_str())
    vocab = definition["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    definition["model"]["byte_fallback"] = True
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(definition)), unk_token="<unk>")
    return Family(tokenizer, {"▁Kranken¤wagen": 40})  # "¤" is not in its alphabet: <0xC2> <0xA4>


@pytest.fixture(scope="module")
def tokenizer(family) -> PreTrainedTokenizerFast:
    return family.tokenizer


def naive_continue_bpe(tokenizer, counts, n, min_count, max_chars):
    """Continued BPE the slow, obvious way: recount every pair each round, and take the most
    frequent one (ties: smallest pair) whose token is allowed, as (pair, count)."""
    backend = tokenizer.backend_tokenizer
    words = {w: [t.value for t in backend.model.tokenize(w)] for w in counts}
    context = len(tokenizer("\n", add_special_tokens=False)["input_ids"])
    ranks: dict = {}

    def allowed(pair):
        text = tokenizer.convert_tokens_to_string(["a", pair[0] + pair[1]])[1:]  # "a": not at the start of text
        pieces = tokenizer.convert_ids_to_tokens(phrase_ids(tokenizer, text))
        pre_tokens = set(tokenizer("\n" + text, add_special_tokens=False).word_ids()[context:])
        return (pair[0] + pair[1] not in tokenizer.get_vocab() and "\ufffd" not in text and len(text) <= max_chars
                and text.strip() and not text.strip().isdigit() and tokenizer.unk_token not in pieces
                and len(pre_tokens) == 1 and apply_merges(pieces, ranks) == list(pair))

    learned = []
    while len(learned) < n:
        pairs = Counter()
        for word, parts in words.items():
            for pair in set(zip(parts, parts[1:])):  # counted as often as the merge fires
                pairs[pair] += (len(parts) - len(apply_merges(parts, {pair: 0}))) * counts[word]
        ranked = sorted((-c, p) for p, c in pairs.items())
        best = next(((p, -c) for c, p in ranked if -c >= min_count and allowed(p)), None)
        if best is None:
            break
        learned.append(best)
        ranks[best[0]] = len(ranks)
        words = {w: apply_merges(parts, {best[0]: 0}) for w, parts in words.items()}
    return learned


def test_incremental_counts_learn_what_recounting_learns(family):
    tokenizer = family.tokenizer
    counts = pre_token_counts(tokenizer, CORPUS) + Counter(family.unemittable)
    learned = continue_bpe(tokenizer, counts, 120)
    assert len(learned) == 120
    assert [(t.merge, t.count) for t in learned] == naive_continue_bpe(tokenizer, counts, 120, 2, 24)
    assert [t.count for t in learned] == sorted((t.count for t in learned), reverse=True)


def test_limits(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True))
    counts = pre_token_counts(tokenizer, CORPUS)
    learned = continue_bpe(tokenizer, counts, 1000, min_count=4, max_chars=10)
    assert learned
    for token in learned:
        assert token.text.strip() and not token.text.strip().isdigit(), token
        assert len(token.text) <= 10 and token.count >= 4, token
    unlimited = continue_bpe(tokenizer, counts, 1000, min_count=4, max_chars=100)
    assert max(len(t.text) for t in unlimited) > 10  # the limit had something to keep out


def test_learned_tokens_survive_expand_with_merges(tokenizer):
    counts = pre_token_counts(tokenizer, CORPUS)
    learned = continue_bpe(tokenizer, counts, 150)
    texts = [t.text for t in learned]
    expansion = expand_with_merges(tokenizer, texts)

    assert expansion.skipped == [] and expansion.intermediates == []
    assert [t.text for t in expansion.requested] == texts
    assert expansion.merges == [t.merge for t in learned]  # exactly the learned merges, in order
    expanded, start = expansion.tokenizer, expansion.new_start
    for i, token in enumerate(learned):
        assert token.pieces == tuple(phrase_ids(tokenizer, token.text))
        assert phrase_ids(expanded, token.text) == [start + i], token
        if token.text[:1] == " " and token.text[1:].isalpha():  # a word: emitted mid-sentence too
            assert start + i in expanded(f"Yes{token.text} yes", add_special_tokens=False)["input_ids"], token
    for sentence in HELD_OUT:
        ids = expanded(sentence, add_special_tokens=False)["input_ids"]
        assert expanded.decode(ids) == sentence
        assert max(ids) >= start


def test_pairs_the_tokenizer_would_not_emit_are_passed_over(family):
    learned = continue_bpe(family.tokenizer, family.unemittable, 100)
    assert learned  # the pairs it can emit
    expansion = expand_with_merges(family.tokenizer, [t.text for t in learned])
    assert expansion.skipped == [] and expansion.intermediates == []


def test_ids_saved_on_the_corpus_are_the_learned_counts(tokenizer):
    # The expanded tokenizer applies the learned merges after every base merge, inside the
    # same pre-tokens, so it tokenises the corpus exactly as the training loop did.
    counts = pre_token_counts(tokenizer, CORPUS)
    learned = continue_bpe(tokenizer, counts, 150)
    expanded = expand_with_merges(tokenizer, [t.text for t in learned]).tokenizer

    def ids(tok):
        return sum(len(x) for x in tok(CORPUS, add_special_tokens=False)["input_ids"])

    saved = ids(tokenizer) - ids(expanded)
    assert saved > 0
    assert saved == sum(t.count for t in learned)


def test_each_new_tokens_occurrences_in_the_corpus_follow_from_the_learned_counts(tokenizer):
    # what pruning weighs a token's saving by: its count when learned, less what later merges took
    counts = pre_token_counts(tokenizer, CORPUS)
    learned = continue_bpe(tokenizer, counts, 150)
    expansion = expand_with_merges(tokenizer, [t.text for t in learned])
    ids = [i for x in expansion.tokenizer(CORPUS, add_special_tokens=False)["input_ids"] for i in x]
    found = Counter(i - expansion.new_start for i in ids if i >= expansion.new_start)
    occurrences = corpus_occurrences(expansion, {t.text: t.count for t in learned})
    assert occurrences == [found[i] for i in range(len(learned))]
    assert any(o < t.count for o, t in zip(occurrences, learned))  # later merges took some: not just the counts
    assert corpus_occurrences(expansion, {t.text: t.count for t in learned[1:]}) is None  # a token without a count


def test_progress_is_reported(tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(bpe_training, "PROGRESS_EVERY", 20)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True))
    calls = []
    continue_bpe(tokenizer, pre_token_counts(tokenizer, CORPUS), 65, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(20, 65), (40, 65), (60, 65)]


def test_bad_arguments(tiny_tokenizer_dir):
    from tokenizers import Tokenizer, models

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True))
    counts = pre_token_counts(tokenizer, CORPUS)
    for bad in ({"n": 0}, {"n": 5, "min_count": 0}, {"n": 5, "max_chars": 0}):
        with pytest.raises(ConfigError, match=">= 1"):
            continue_bpe(tokenizer, counts, **bad)
    wordpiece = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), unk_token="[UNK]"
    )
    with pytest.raises(ConfigError, match="tokens.selection: words"):
        continue_bpe(wordpiece, counts, 5)


def test_pre_token_counts_are_vocabulary_strings(tiny_tokenizer_dir, tokenizer):
    byte_level = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True))
    assert pre_token_counts(byte_level, ["The river, the river.", ""]) == Counter(
        {"The": 1, "Ġriver": 2, ",": 1, "Ġthe": 1, ".": 1}
    )
    if type(tokenizer.backend_tokenizer.pre_tokenizer).__name__ == "Metaspace":
        from tokenizers import pre_tokenizers

        counts = pre_token_counts(tokenizer, CORPUS)
        assert counts["▁Krankenwagen"] == 11 and counts["▁Krankenwagen."] == 0
        # Llama-2-style: Metaspace without splitting leaves each document whole; cut the same.
        whole = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>")
        whole.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
        assert pre_token_counts(whole, CORPUS) == counts


def test_count_pre_tokens_in_process(tmp_path, tiny_tokenizer_dir):
    for i, text in enumerate(CORPUS + ["", "   "]):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True))
    assert count_pre_tokens(FileDataSource(paths=str(tmp_path)), tokenizer) == pre_token_counts(tokenizer, CORPUS)


def test_count_pre_tokens_on_ray(ray_session, tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(file_source, "PART_BYTES", 500)  # many parts, so blocks are summed
    for i, text in enumerate(CORPUS + ["", "   "]):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True))
    source = FileDataSource(paths=str(tmp_path))
    assert count_pre_tokens(source, tokenizer, num_workers=2) == pre_token_counts(tokenizer, CORPUS)


@pytest.mark.slow
def test_smollm2_on_the_python_docs(smollm2_dir, docs_corpus):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts, size = [], 0
    for path in sorted(docs_corpus.rglob("*.txt")):
        texts.append(path.read_text(encoding="utf-8"))
        size += len(texts[-1])
        if size > 300_000:
            break
    learned = continue_bpe(tokenizer, pre_token_counts(tokenizer, texts), 100)
    assert len(learned) == 100
    assert [t.count for t in learned] == sorted((t.count for t in learned), reverse=True)
    expansion = expand_with_merges(tokenizer, [t.text for t in learned])
    assert expansion.skipped == [] and expansion.intermediates == []
    assert expansion.merges == [t.merge for t in learned]
    before = sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    after = sum(len(x) for x in expansion.tokenizer(texts, add_special_tokens=False)["input_ids"])
    assert before - after == sum(t.count for t in learned)
