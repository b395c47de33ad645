"""Selection by continued BPE training: the N merges a BPE tokenizer would learn next on a corpus.

    counts = pre_token_counts(tokenizer, texts)  # on Ray Data: data.mining.pre_token_counts.count_pre_tokens
    learned = continue_bpe(tokenizer, counts, n=5000)
    expand_with_merges(tokenizer, [t.text for t in learned])

Every distinct pre-token starts from its current tokenisation (the tokenizer's own BPE) and
the most frequent adjacent pair is merged, again and again, as BPE training does. Pair counts
are updated incrementally (pair -> count, pair -> pre-tokens holding it), so thousands of merges
on megabytes of text take seconds. Ties go to the lexicographically smallest pair. A pair is
counted as often as merging it would fire: "a a a" holds (a, a) once.

A pair is passed over (never learned; the next best is taken) when its merged token is already
in the vocabulary, is only digits or only whitespace, is longer than `max_chars` characters,
holds byte-fallback or unknown pieces or part of a UTF-8 character, or is no pre-token of its
own: its text, tokenised mid-document, must be one pre-token, the newline before it not joined
in ("'r" from the byte-level pre-token "'re" is two: "'" and "r").

BPE acts on a span of a pre-token as on the same text alone as long as no merge crosses the
span's ends, and none has crossed the ends of a pair that is merged (merges only join). So a
learned token's own text, tokenised and merged with the merges learned before it, ends as
exactly its pair: `expand_with_merges` plans exactly the learned merges (one per token, no
intermediates), the expanded tokenizer tokenises the corpus as this loop did, and `count` is
the number of ids each new token saves there. (One exception: where the newline is an
ordinary character inside SentencePiece-style words, a later merge may join it to a token
without "▁", which expand_with_merges, checking tokens after a newline, then refuses.)

No transformers here: the Ray counting tasks import this module.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, TypeVar

from tokenizers.models import BPE

from tokdist_ray.errors import ConfigError
from tokdist_ray.vocab.bpe_model import BYTE_PIECE, Pair, surface_text

T = TypeVar("T")

PROGRESS_EVERY = 250  # merges between progress(i, n) calls

# SentencePiece-style words: each "▁" starts one, as Metaspace(split=True) cuts them.
_SENTENCEPIECE_WORD = re.compile("▁[^▁]*|[^▁]+")


@dataclass(frozen=True)
class LearnedToken:
    text: str  # surface text mid-document, " iterable"
    vocab_string: str  # "Ġiterable" / "▁iterable"
    count: int  # occurrences in the corpus's pre-tokens once learned = ids it saves there
    pieces: tuple[int, ...]  # the original ids it replaces (tokens.phrase_ids)
    merge: Pair  # (left, right) vocabulary strings


def _backend(tokenizer):
    """The tokenizers.Tokenizer of an HF fast tokenizer (or the Tokenizer itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _pre_tokenizer(backend) -> Callable[[str], list[str]]:
    """text -> its pre-tokens as vocabulary strings: normalizer, then pre-tokenizer. Where
    those leave "▁"-marked text whole (Metaspace with split=False, or no pre-tokenizer, as in
    Llama 2 style tokenizers) it is cut into words as SentencePiece does, or the whole
    document would be one pre-token and merges would run across words."""
    normalize = backend.normalizer.normalize_str if backend.normalizer is not None else str
    split = backend.pre_tokenizer.pre_tokenize_str if backend.pre_tokenizer is not None else lambda t: [(t, None)]

    def pre_tokens(text: str) -> list[str]:
        return [piece for piece, _ in split(normalize(text))]

    if any("▁" in p for p in pre_tokens(" a b")):
        return lambda text: [w for p in pre_tokens(text) for w in _SENTENCEPIECE_WORD.findall(p)]
    return pre_tokens


def pre_token_counts(tokenizer, texts: Iterable[str]) -> Counter[str]:
    """How often each pre-token (as a vocabulary string, "Ġiterable") occurs in `texts`.
    `tokenizer`: an HF fast tokenizer or a tokenizers.Tokenizer."""
    pre_tokens = _pre_tokenizer(_backend(tokenizer))
    counts: Counter[str] = Counter()
    for text in texts:
        if text:
            counts.update(pre_tokens(text))
    return counts


def _pairs(parts: list[str]) -> Counter[Pair]:
    """Adjacent pairs, each counted as often as merging it fires (left to right)."""
    pairs: Counter[Pair] = Counter()
    previous = None
    for pair in zip(parts, parts[1:]):
        if pair == previous:  # (a, a) overlapping the one just counted
            previous = None
            continue
        pairs[pair] += 1
        previous = pair
    return pairs


def _merged(parts: list[str], left: str, right: str) -> list[str]:
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
            out.append(left + right)
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


class _PairCounts:
    """The corpus's pre-tokens in their current pieces, with count-weighted pair counts."""

    def __init__(self, model: BPE, counts: Mapping[str, int], min_count: int):
        self.min_count = min_count
        self.words: list[list[str]] = []
        self.freqs: list[int] = []
        self.counts: Counter[Pair] = Counter()
        self.where: defaultdict[Pair, set[int]] = defaultdict(set)  # pair -> indices of words holding it
        for word, freq in counts.items():
            parts = [t.value for t in model.tokenize(word)]
            if len(parts) > 1 and freq > 0:
                for pair, k in _pairs(parts).items():
                    self.counts[pair] += k * freq
                    self.where[pair].add(len(self.words))
                self.words.append(parts)
                self.freqs.append(freq)
        self.heap = [(-c, pair) for pair, c in self.counts.items() if c >= min_count]
        heapq.heapify(self.heap)
        self.passed_over: set[Pair] = set()

    def best(self, vet: Callable[[Pair], T | None]) -> tuple[Pair, T] | None:
        """The most frequent pair with at least min_count that `vet` passes, with what `vet`
        said of it, or None. The heap holds stale entries too (a pair's count when pushed);
        those are dropped here."""
        while self.heap and -self.heap[0][0] >= self.min_count:
            count, pair = heapq.heappop(self.heap)
            if -count != self.counts.get(pair) or pair in self.passed_over:
                continue
            verdict = vet(pair)
            if verdict is not None:
                return pair, verdict
            self.passed_over.add(pair)
        return None

    def merge(self, pair: Pair) -> int:
        """Merge `pair` in every word; returns how many times it fired (count-weighted)."""
        left, right = pair
        fired, changed = 0, set()
        for i in self.where.pop(pair):
            old, freq = self.words[i], self.freqs[i]
            new = _merged(old, left, right)
            fired += (len(old) - len(new)) * freq
            before, after = _pairs(old), _pairs(new)
            for p in before.keys() | after.keys():
                if before[p] != after[p]:
                    self.counts[p] += (after[p] - before[p]) * freq
                    changed.add(p)
                if p not in after and p != pair:
                    self.where[p].discard(i)
                elif p not in before:
                    self.where[p].add(i)
            self.words[i] = new
        for p in changed:
            if self.counts[p] <= 0:
                del self.counts[p]
            elif self.counts[p] >= self.min_count:
                heapq.heappush(self.heap, (-self.counts[p], p))
        return fired


class _Vetting:
    """Whether a pair may be learned, and the surface text and pieces of its token."""

    def __init__(self, backend, max_chars: int):
        self.backend = backend
        self.max_chars = max_chars
        self.vocab = set(backend.get_vocab(with_added_tokens=True))
        self.unk = backend.model.unk_token
        self.context = backend.encode("\n", add_special_tokens=False).ids  # mid-document, as tokens.phrase_ids
        self._surface = surface_text(backend)

    def surface(self, vocab_string: str) -> str:
        return self._surface([vocab_string])

    def token(self, pair: Pair) -> tuple[str, tuple[int, ...]] | None:
        """(surface text, original ids) of the pair's token, or None if it may not be learned."""
        left, right = pair
        merged = left + right
        if merged in self.vocab or any(p == self.unk or BYTE_PIECE.match(p) for p in (left, right)):
            return None
        text = self.surface(merged)
        if "\ufffd" in text or len(text) > self.max_chars or not text.strip() or text.strip().isdigit():
            return None
        encoding = self.backend.encode("\n" + text, add_special_tokens=False)
        n = len(self.context)
        if encoding.ids[:n] != self.context or len(set(encoding.word_ids[n:])) != 1:
            return None  # the newline joined the token, or it spans pre-tokens
        return text, tuple(encoding.ids[n:])


def _check_arguments(tokenizer, n: int, min_count: int, max_chars: int) -> None:
    for name, key, value in (("n", "from_corpus", n), ("min_count", "min_count", min_count),
                             ("max_chars", "max_chars", max_chars)):
        if value < 1:
            raise ConfigError(f"continued BPE training needs {name} >= 1 (`tokens.{key}` in a job), got {value}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.model if backend is not None else None
    if not isinstance(model, BPE):
        what = "not a fast (Rust) tokenizer" if model is None else f"a {type(model).__name__} tokenizer"
    elif model.continuing_subword_prefix or model.end_of_word_suffix:
        what = "a BPE tokenizer that marks word-internal pieces (continuing_subword_prefix / end_of_word_suffix)"
    else:
        return
    raise ConfigError(
        f"selection by continued BPE training needs a fast BPE tokenizer, and this is {what}; "
        "choose frequent fragmented words instead: `tokens.selection: words`"
    )


def continue_bpe(
    tokenizer,
    counts: Mapping[str, int],
    n: int,
    min_count: int = 2,
    max_chars: int = 24,
    progress: Callable[[int, int], None] | None = None,
) -> list[LearnedToken]:
    """The next `n` merges BPE learns on `counts` (pre-token -> count, see pre_token_counts),
    continuing from the merges of `tokenizer` (an HF fast BPE tokenizer), in rank order. Fewer
    when no pair left occurs `min_count` times. `progress(i, n)` is called every
    PROGRESS_EVERY merges."""
    _check_arguments(tokenizer, n, min_count, max_chars)
    backend = tokenizer.backend_tokenizer
    pairs = _PairCounts(backend.model, counts, min_count)
    vetting = _Vetting(backend, max_chars)
    learned: list[LearnedToken] = []
    while len(learned) < n and (best := pairs.best(vetting.token)) is not None:
        pair, (text, pieces) = best
        learned.append(LearnedToken(text, pair[0] + pair[1], pairs.merge(pair), pieces, pair))
        if progress is not None and len(learned) % PROGRESS_EVERY == 0:
            progress(len(learned), n)
    return learned
