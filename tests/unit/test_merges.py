"""The tokenizer built on merges (vocab/merges.py, vocab/bpe_model.py).

Three BPE tokenizers: SmolLM2's (byte-level, real), the suite's tiny byte-level BPE, and
a SentencePiece-style BPE (Metaspace, byte fallback, `<0x..>` byte tokens, one added
special token after the model vocabulary) trained here on a few KB of the Python docs.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from itertools import accumulate

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokdist_ray.vocab import bpe_model
from tokdist_ray.vocab.bpe_model import BpeModel, apply_merges, first_merge
from tokdist_ray.vocab.merges import (
    ADDED_TOKENS,
    NOT_EMITTED,
    OUTSIDE_ALPHABET,
    SPANS_PRE_TOKENS,
    expand_with_merges,
)
from tokdist_ray.vocab.tokens import IN_VOCABULARY, phrase_ids

TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/"
UNICODE_TEXT = (
    "Der Krankenwagen fuhr um 23:45 Uhr los – schnell! Ça coûte 12,50 €, naïve café.\n"
    "東京都庁は新宿にあります。 Ελληνικά, русский текст, עברית; emoji 🚑🦋 and tabs\there.\n"
    '  Indented  code:\tx = [1, 2, 3]  # comment\n\nprint(f"{x!r:>10}")  \n'
)
TOKENIZERS = ("smollm2", "tiny", "sentencepiece")


def _read(name: str, size: int) -> str:
    with open(TUTORIAL + name, encoding="utf-8") as f:
        return f.read(size)


@pytest.fixture(scope="module")
def heldout_text(docs_corpus) -> str:
    """About 9 KB: two tutorial pages the SentencePiece BPE is not trained on, and unicode."""
    return _read("controlflow.rst.txt", 5000) + _read("errors.rst.txt", 3000) + UNICODE_TEXT


def _sentencepiece_bpe(lines: list[str]) -> PreTrainedTokenizerFast:
    """Llama 2 / Mistral layout: byte tokens in the model vocabulary (not added tokens),
    BOS from the post-processor, plus an added special token placed after the vocabulary."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    layout = json.loads(tok.to_str())
    layout["added_tokens"] = [t for t in layout["added_tokens"] if t["content"] in specials]
    tok = Tokenizer.from_str(json.dumps(layout))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.add_tokens([AddedToken("<|im_start|>", special=True)], special_tokens=True)
    wrapped.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}</s>{% endfor %}"
    return wrapped


@pytest.fixture(scope="module")
def tokenizers_by_name(smollm2_dir, tiny_tokenizer_dir, docs_corpus):
    train = (_read("classes.rst.txt", 8000) + _read("introduction.rst.txt", 8000)).splitlines()
    return {
        "smollm2": AutoTokenizer.from_pretrained(smollm2_dir),
        "tiny": AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True)),
        "sentencepiece": _sentencepiece_bpe(train),
    }


def _frequent_split_words(tokenizer, text: str, n: int = 40) -> list[str]:
    """The n most frequent words of `text` the tokenizer splits into several pieces."""
    words = Counter(re.findall(r" ?[A-Za-z]{3,}", text))
    return [w for w, _ in words.most_common() if len(phrase_ids(tokenizer, w)) > 1][:n]


@pytest.fixture(scope="module")
def expansions(tokenizers_by_name, heldout_text):
    """Each tokenizer expanded with frequent held-out words, a German word and a phrase."""
    made = {}
    for name, tokenizer in tokenizers_by_name.items():
        words = _frequent_split_words(tokenizer, heldout_text) + [" Krankenwagen", " New York"]
        made[name] = expand_with_merges(tokenizer, words)
    return made


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _boundaries(tokenizer, ids: list[int]) -> tuple[str, set[int]]:
    """(the ids' vocabulary strings joined, the offsets between tokens in that string)."""
    strings = tokenizer.convert_ids_to_tokens(ids)
    return "".join(strings), set(accumulate(map(len, strings)))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_bpe_simulation_matches_the_tokenizer(name, tokenizers_by_name, heldout_text):
    """The planner's BPE (apply_merges) merges every pre-token exactly as the Rust model does."""
    backend = tokenizers_by_name[name].backend_tokenizer
    model = BpeModel.from_tokenizer_json(json.loads(backend.to_str()))
    pre_tokens = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(heldout_text)]
    pre_tokens = [p for p in pre_tokens if set(p) <= model.vocab.keys()]  # no byte-fallback pieces
    assert len(pre_tokens) > 1000
    for pre_token in pre_tokens:
        assert apply_merges(list(pre_token), model.ranks) == [t.value for t in backend.model.tokenize(pre_token)]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_expanded_tokenizer_round_trips_held_out_text(name, tokenizers_by_name, expansions, heldout_text):
    original, expanded = tokenizers_by_name[name], expansions[name].tokenizer
    assert original.decode(_ids(original, heldout_text)) == heldout_text
    ids = _ids(expanded, heldout_text)
    assert expanded.decode(ids) == heldout_text
    assert len(ids) < len(_ids(original, heldout_text))  # the new tokens are used


@pytest.mark.parametrize("name", TOKENIZERS)
def test_expanded_tokenisation_is_the_original_with_merges_on_top(name, tokenizers_by_name, expansions, heldout_text):
    """Token boundaries only disappear, never move; where no new merge applies nothing changes."""
    original, expansion = tokenizers_by_name[name], expansions[name]
    expanded = expansion.tokenizer
    joined, before = _boundaries(original, _ids(original, heldout_text))
    joined_after, after = _boundaries(expanded, _ids(expanded, heldout_text))
    assert joined_after == joined and after < before

    merged = [expanded.convert_tokens_to_string([a + b]).strip() for a, b in expansion.merges]
    untouched = [line for line in heldout_text.splitlines() if not any(m in line for m in merged)]
    assert sum(map(len, untouched)) > 500
    for line in untouched:
        assert _ids(expanded, line) == _ids(original, line)


@pytest.mark.parametrize(
    "name,word,longer",
    [
        ("smollm2", " iterable", " iterables"),
        ("tiny", " sequence", " sequences"),
        ("sentencepiece", " sequence", " sequences"),
    ],
)
def test_new_word_is_not_emitted_inside_a_longer_word(name, word, longer, tokenizers_by_name):
    """Merges emit ` iterable` where BPE would, not inside ` iterables`; added tokens do.
    (An intermediate such as ` sequ` on the way to ` sequence` may fire there: it is a token
    of its own.)"""
    original = tokenizers_by_name[name]
    pieces = phrase_ids(original, word)
    assert phrase_ids(original, longer)[: len(pieces)] != pieces  # BPE splits the longer word differently
    merged = expand_with_merges(original, [word])
    new_id = merged.new_start
    assert new_id in _ids(merged.tokenizer, f"Take a{word} and{word}, then stop.")
    assert new_id not in _ids(merged.tokenizer, f"Take a{longer} now.")
    added = expand_with_merges(original, [word], mode=ADDED_TOKENS)
    assert added.mode == ADDED_TOKENS and new_id in _ids(added.tokenizer, f"Take a{longer} now.")


@pytest.mark.parametrize(
    "name,word", [("smollm2", " Krankenwagen"), ("tiny", " Schmetterling"), ("sentencepiece", " dictionaries")]
)
def test_intermediates_are_reported_and_emitted(name, word, tokenizers_by_name):
    original = tokenizers_by_name[name]
    expansion = expand_with_merges(original, [word])
    pieces = phrase_ids(original, word)
    assert len(pieces) >= 3 and expansion.n_requested == 1
    assert len(expansion.intermediates) == len(pieces) - 2  # left-deep: one prefix per inner merge
    for i, token in enumerate(expansion.intermediates, start=expansion.new_start + 1):
        assert word.startswith(token.text) and token.phrase_ids == tuple(pieces[: len(token.phrase_ids)])
        assert phrase_ids(expansion.tokenizer, token.text) == [i]  # a prefix alone is emitted too
    assert phrase_ids(expansion.tokenizer, word) == [expansion.new_start]


def test_requested_tokens_serve_as_intermediates(tokenizers_by_name):
    """` Krankenwagen` is built through the requested `wagen`, which saves an intermediate."""
    expansion = expand_with_merges(tokenizers_by_name["smollm2"], [" Krankenwagen", "wagen"])
    assert [t.text for t in expansion.requested] == [" Krankenwagen", "wagen"]
    assert [t.text for t in expansion.intermediates] == [" Krank", " Kranken"]
    assert expansion.merges[-1] == ("ĠKranken", "wagen")


def test_vocabulary_entries_serve_as_intermediates():
    """`abc` is in the vocabulary but BPE never builds it from `a bc`; the path to `abcd` reuses it."""
    vocab = {c: i for i, c in enumerate(["a", "b", "c", "d", "bc", "ab", "abc"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("ab", "c")]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert tokenizer.convert_ids_to_tokens(_ids(tokenizer, "abcd")) == ["a", "bc", "d"]
    expansion = expand_with_merges(tokenizer, ["abcd"])
    assert expansion.merges == [("a", "bc"), ("abc", "d")] and not expansion.intermediates
    assert _ids(expansion.tokenizer, "abcd abc") == [7, 6]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokens_that_cannot_be_emitted_are_reported(name, tokenizers_by_name):
    tokenizer = tokenizers_by_name[name]
    single = tokenizer.convert_ids_to_tokens(_ids(tokenizer, " the"))
    assert len(single) == 1
    expansion = expand_with_merges(tokenizer, [" New York", " the", " Ärzteschaft", " Dictionaries"])
    reasons = {s["token"]: s["reason"] for s in expansion.skipped}
    assert reasons[" New York"] == SPANS_PRE_TOKENS and reasons[" the"] == IN_VOCABULARY
    if name == "sentencepiece":  # Ä is not in its alphabet: byte fallback
        assert reasons[" Ärzteschaft"] == OUTSIDE_ALPHABET
    else:
        assert " Ärzteschaft" not in reasons
    assert " Dictionaries" not in reasons
    assert len(expansion.requested) + len(expansion.skipped) == 4


def test_tokens_the_spliced_tokenizer_does_not_emit_are_dropped(tokenizers_by_name, monkeypatch):
    """Whatever keeps a planned token from being emitted, it is reported and leaves no trace."""
    spliced = BpeModel.spliced

    def without_wagen(self, new_vocab, new_merges):  # as if a merge were pre-empted
        return spliced(self, new_vocab, [m for m in new_merges if m[0] + m[1] != "ĠKrankenwagen"])

    monkeypatch.setattr(bpe_model.BpeModel, "spliced", without_wagen)
    tokenizer = tokenizers_by_name["smollm2"]
    expansion = expand_with_merges(tokenizer, [" Krankenwagen", " iterable"])
    assert expansion.skipped == [{"token": " Krankenwagen", "reason": NOT_EMITTED}]
    assert [t.text for t in expansion.tokens] == [" iterable"] and len(expansion.tokenizer) == len(tokenizer) + 1


def test_new_ids_follow_added_tokens_and_keep_special_handling(tokenizers_by_name, expansions):
    """The SentencePiece BPE's <|im_start|> sits after its model vocabulary: new ids start after it."""
    original, expansion = tokenizers_by_name["sentencepiece"], expansions["sentencepiece"]
    expanded = expansion.tokenizer
    assert expansion.new_start == len(original) == original.convert_tokens_to_ids("<|im_start|>") + 1
    assert len(expanded) == len(original) + len(expansion.tokens)
    for i, token in enumerate(expansion.requested, start=expansion.new_start):
        assert phrase_ids(expanded, token.text) == [i]
    text = "<|im_start|>hello dictionaries"
    bos_and_special = [original.bos_token_id, len(original) - 1]
    assert expanded(text)["input_ids"][:2] == original(text)["input_ids"][:2] == bos_and_special
    assert expanded.chat_template == original.chat_template and expanded.eos_token == "</s>"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_saved_tokenizer_reloads_and_encodes_identically(name, expansions, heldout_text, tmp_path):
    expanded = expansions[name].tokenizer
    expanded.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(expanded) and reloaded.chat_template == expanded.chat_template
    for line in heldout_text.splitlines():
        assert reloaded(line)["input_ids"] == expanded(line)["input_ids"]


def test_non_bpe_tokenizers_fall_back_to_added_tokens(caplog):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False)
    tok.train_from_iterator(["the river runs through the old town"] * 5, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with caplog.at_level(logging.WARNING, logger="tokdist_ray"):
        expansion = expand_with_merges(tokenizer, ["riverside"])
    assert expansion.mode == ADDED_TOKENS and "WordPiece" in caplog.text
    assert _ids(expansion.tokenizer, "riverside") == [len(tokenizer)]


@pytest.mark.parametrize("merges,appended", [(["a b"], "ab b"), ([["a", "b"]], ["ab", "b"])])
def test_splicing_keeps_the_merge_format_of_the_file(merges, appended):
    """Older tokenizer.json files write merges as "a b" strings, newer ones as pairs."""
    layout = json.loads(Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).to_str())
    layout["model"]["merges"] = merges
    spliced = json.loads(BpeModel.from_tokenizer_json(layout).spliced({"abb": 3}, [("ab", "b")]))
    assert spliced["model"]["merges"] == merges + [appended]
    assert Tokenizer.from_str(json.dumps(spliced)).encode("abbab").tokens == ["abb", "ab"]


def test_merge_tree_reuses_known_entries_and_prefers_prefixes():
    def costs(known):
        return lambda s: 0 if s in known else 1

    parts = ["a", "b", "c", "d"]
    assert first_merge(parts, costs(set())) == 0  # ((ab)c)d: left-deep, prefixes
    assert first_merge(parts, costs({"bc"})) == 1  # (a(bc))d: one new entry, not two
    assert first_merge(parts, costs({"cd", "bcd"})) == 2  # a(b(cd)): no new entry
    assert first_merge(parts, costs({"abc", "ab", "cd"})) == 0


@pytest.mark.parametrize("source,target", [("smollm2", "sentencepiece"), ("sentencepiece", "tiny")])
def test_a_target_tokenizers_tokens_enter_by_merges_where_they_can_else_as_added_tokens(
    source, target, tokenizers_by_name, heldout_text
):
    """Byte-level BPE and SentencePiece-style BPE, each the other's target: the target's
    tokens the source lacks enter through merges where the source gives them a path,
    otherwise as added tokens (which keeps ` New York`-like tokens the target has)."""
    original, target_tokenizer = tokenizers_by_name[source], tokenizers_by_name[target]
    expansion = expand_with_merges(original, target_tokenizer, unreachable=ADDED_TOKENS)
    merged, added = expansion.tokens[: len(expansion.tokens) - len(expansion.added_tokens)], expansion.added_tokens
    assert len(merged) > 20 and expansion.mode == "merges"
    if source == "smollm2":  # ` line.`, `es,`: one token there, two pre-tokens here
        assert len(added) > 10 and " line." in added
    assert not {s["reason"] for s in expansion.skipped} & {SPANS_PRE_TOKENS, NOT_EMITTED, OUTSIDE_ALPHABET}
    tokenizer = expansion.tokenizer
    assert len(tokenizer) == expansion.new_start + len(expansion.tokens)
    assert [t.text for t in expansion.tokens[len(merged) :]] == added
    for i, token in enumerate(expansion.requested[:40]):
        assert _ids(tokenizer, f"\n{token.text}")[-1] == expansion.new_start + i
    text = heldout_text[:3000]
    assert tokenizer.decode(_ids(tokenizer, text)) == text
    skipping = expand_with_merges(original, target_tokenizer)
    assert skipping.added_tokens == [] and len(skipping.tokens) == len(merged)


def test_pieces_of_one_character_keep_tokens_apart_by_text(tiny_tokenizer_dir):
    """Intermediates that end inside a UTF-8 character all decode to U+FFFD; reports,
    quotas and snippet counts key tokens by text, so each goes by its own name."""
    from tokdist_ray.data.mining.matching import spells_texts

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    expansion = expand_with_merges(tokenizer, [" 한국어", " 日本語"])
    backend = tokenizer.backend_tokenizer
    partial = [t for t in expansion.intermediates
               if "\ufffd" in expansion.tokenizer.decode([expansion.new_start + expansion.tokens.index(t)])]
    assert len(partial) >= 2, "the check needs pieces of characters"
    texts = [t.text for t in expansion.tokens]
    assert len(set(texts)) == len(texts) and not any("\ufffd" in t for t in texts)
    assert all(t.text == "".join(backend.id_to_token(i) for i in t.phrase_ids) for t in partial)
    assert spells_texts(expansion.tokenizer.backend_tokenizer, texts, expansion.new_start)
