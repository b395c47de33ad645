"""Find new tokens in documents: surface strings first, token ids to confirm.

Tokenising the corpus is what mining costs, and most of a corpus holds none of the new
words. So the raw text is searched for the tokens' surface strings with one Aho-Corasick
automaton, and only a *region* around each candidate is tokenised, with the expanded
tokenizer (new tokens merged as the exported tokenizer merges them). A candidate is an
occurrence where the region's ids hold the token's new id: a surface match inside a
longer word that BPE splits otherwise is not one.

Why a region's ids are the document's ids: regions start and end at *cuts* (Cuts): a
single space between two non-space characters, or a line break after a letter or digit.
Byte-level BPE pre-tokenisers (GPT-2, Llama 3, Qwen, SmolLM) never put such a character
into one pre-token with the character before it, and BPE merges stay inside pre-tokens,
so the document's ids split at every cut. `Cuts.safe_for` keeps the rules that hold for
the tokenizer at hand on a probe text, and `spells_texts` checks that an id occurrence
is a surface occurrence; where either fails, TokenScanner tokenises whole documents
(still exact, only slower).

A region yields an occurrence only where its window did not run into a region edge that
lies inside the document (there the document could have given more context, and
window_around would have taken it). Such a candidate gets a wider region on the next
round. A region's margin starts at what a window needs, converted to characters with the
running characters-per-id of this corpus, and doubles on each miss.

With thousands of tokens (continued BPE learns frequent pieces, " ld", "(+") nearly
every word is a candidate, regions cover whole documents, and two costs grow with the
matches: looking up cuts (done once per run of overlapping candidates) and settling
windows (snippets.settle encodes each window's text again). A window is settled only
while its token still lacks `quota` distinct windows in the batch, and one whose ends
are cuts, or whose pieces up to the nearest cuts encode alone to its end ids, is known
to encode back without encoding it whole (Cuts.encodes_back).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import ahocorasick

from tokdist_ray.data.budget import quota_at
from tokdist_ray.data.snippets import settle, window_around

# Where a scan's CPU time goes: the surface search and regions, tokenising regions (with
# the new ids' windows), settling windows.
SEARCH, TOKENISE, SETTLE = "search", "tokenise", "settle"
PHASES = (SEARCH, TOKENISE, SETTLE)

# Prose, code, markup, digits, odd whitespace and non-Latin script: every cut in it must
# split the probe's ids exactly where whole-text tokenisation does.
CUT_PROBE = (
    "The quick brown fox, who didn't care, jumped over 12345 lazy dogs (and 7 cats)! "
    "Naïve café owners sold crème brûlée for €3.50 each; 東京 and Москва joined in 2023.\n"
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # a comment\n\n"
    "Tabs\there,  two spaces, trailing space \nand a new line; URLs like https://x.org/a?b=1 "
    "and e-mail a.b@c.de; \"quoted\" 'single' [bracketed] {braced} <tag attr=\"v\">x</tag>\n"
    "x**2 + y_1 >= 0 && !done ... emoji 🙂👍 done. I'll we've they're it's 1,000,000.00\n"
    "Heading\n=======\n\n.. note::\n\n   Indented 42\n   * item one\n   * item 2\r\nend\n\t\tdone\n"
    "x = 1\ny = 2;\nreturn\n\n\nz\n  \nEND"
)


class Cuts:
    """Where a region may start or end: a character whose position splits the
    document's ids. Rules, by the character at the cut:
      " "   a single space between two non-space characters
      "\n"  a line break right after a letter or digit
    A rule is used only if it holds on CUT_PROBE for the tokenizer at hand."""

    RULES = {
        " ": lambda text, p: not text[p - 1].isspace() and not text[p + 1].isspace(),
        "\n": lambda text, p: text[p - 1].isalnum(),
    }

    def __init__(self, chars: Sequence[str]):
        self.chars = tuple(chars)

    @classmethod
    def safe_for(cls, tokenizer) -> Cuts:
        """The rules under which cutting CUT_PROBE (plus the added tokens) keeps its ids."""
        added = tokenizer.get_added_tokens_decoder()
        probe = CUT_PROBE + " " + " ".join(token.content for token in added.values())
        whole = tokenizer.encode(probe, add_special_tokens=False).ids

        def keeps_ids(char: str) -> bool:
            rule = cls((char,))
            splits = [p for p in range(len(probe)) if rule.is_cut(probe, p)]
            pieces = tokenizer.encode_batch([probe[a:b] for a, b in zip([0] + splits, splits + [len(probe)])], add_special_tokens=False)
            return [i for piece in pieces for i in piece.ids] == whole

        return cls([char for char in cls.RULES if keeps_ids(char)])

    def is_cut(self, text: str, p: int) -> bool:
        return 0 < p < len(text) - 1 and text[p] in self.chars and self.RULES[text[p]](text, p)

    def before(self, text: str, x: int) -> int:
        """The last cut at or before x, else the document start."""
        best = 0
        for char in self.chars:
            p = text.rfind(char, best, max(0, x) + 1)
            while p > best and not self.is_cut(text, p):
                p = text.rfind(char, best, p)
            best = max(best, p)
        return best

    def encodes_back(self, tokenizer, text: str, window: list[int], lo: int, hi: int) -> bool:
        """Whether `window`, the document's ids of text[lo:hi], is what text[lo:hi] encodes
        to alone, found by encoding only its ends. Cuts c1 <= c2 in the window split it
        into head, middle and tail, and the middle encodes to the document's ids. So do
        the head and tail alone encode to the window's first and last ids? (The window's
        ids must spell its text, and each cut must be one of the window's own too, with
        its neighbours inside.) False when that cannot be told: settle then encodes it all."""
        if tokenizer.decode(window, skip_special_tokens=False) != text[lo:hi]:
            return False
        c1 = lo if lo == 0 or self.is_cut(text, lo) else self.after(text, lo + 1)
        c2 = hi if hi == len(text) or self.is_cut(text, hi) else self.before(text, hi - 1)
        inner = all(c in (lo, hi) or lo < c < hi - 1 for c in (c1, c2))
        if not (lo <= c1 <= c2 <= hi and inner):
            return False
        head, tail = self._ids(tokenizer, text[lo:c1]), self._ids(tokenizer, text[c2:hi])
        return (len(head) + len(tail) <= len(window) and window[: len(head)] == head
                and window[len(window) - len(tail):] == tail
                and tokenizer.decode(head, skip_special_tokens=False) == text[lo:c1]
                and tokenizer.decode(tail, skip_special_tokens=False) == text[c2:hi])

    @staticmethod
    def _ids(tokenizer, text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def after(self, text: str, y: int) -> int:
        """The first cut at or after y, else the document end."""
        best = len(text)
        for char in self.chars:
            p = text.find(char, max(0, y), best)
            while p != -1 and not self.is_cut(text, p):
                p = text.find(char, p + 1, best)
            best = best if p == -1 else p
        return best


def _window_chars(encoding, n: int, region, first: int, end: int) -> tuple[int, int]:
    """The document characters of a region's ids[first:end] (`n` ids in all)."""
    lo = region.lo + encoding.token_to_chars(first)[0]
    return lo, (region.lo + encoding.token_to_chars(end)[0] if end < n else region.hi)


def spells_texts(tokenizer, texts: Sequence[str], new_start: int) -> bool:
    """Whether every occurrence of a new id is a surface occurrence of its text: no
    normalizer, and each new id decodes to its token's text exactly. A piece of a UTF-8
    character (it decodes to U+FFFD) has no surface to find: its occurrences are counted
    where other tokens' windows hold it."""
    if tokenizer.normalizer is not None:
        return False
    decoded = (tokenizer.decode([new_start + i], skip_special_tokens=False) for i in range(len(texts)))
    return all(d == t or "\ufffd" in d for d, t in zip(decoded, texts))


class SurfaceMatcher:
    """Aho-Corasick over raw text for the surface strings of a set of tokens."""

    def __init__(self, texts: Sequence[str], indices: Iterable[int]):
        self.indices = frozenset(indices)
        by_text: dict[str, list[int]] = {}
        for index in self.indices:
            by_text.setdefault(texts[index], []).append(index)
        self._automaton = ahocorasick.Automaton()
        for text, holders in by_text.items():
            self._automaton.add_word(text, (len(text), tuple(holders)))
        if by_text:
            self._automaton.make_automaton()

    def spans(self, text: str, open_set: frozenset[int] | None = None) -> list[tuple[int, int]]:
        """(start, end) character spans of every surface match (of a token in `open_set`, if
        given), ordered by end."""
        if not self.indices:
            return []
        return [
            (end + 1 - length, end + 1) for end, (length, holders) in self._automaton.iter(text)
            if open_set is None or any(i in open_set for i in holders)
        ]


def _runs(spans: list[tuple[int, int]], margin: int) -> Iterable[tuple[list[int], int]]:
    """Sorted spans in runs whose margins overlap, as (starts, last end): the regions of a
    run's spans are sure to merge, so cuts are looked up once per run, not per span (at
    thousands of tokens nearly every word is a span)."""
    starts: list[int] = []
    end = 0
    for start, span_end in spans:
        if starts and start - margin < end + margin:
            starts.append(start)
            end = max(end, span_end)
        else:
            if starts:
                yield starts, end
            starts, end = [start], span_end
    if starts:
        yield starts, end


@dataclass(frozen=True)
class Hit:
    """One occurrence: the document, where it starts (in characters) and its snippet."""

    doc: int
    char_start: int
    token_index: int
    window: list[int]  # expanded ids
    token_position: int  # of the new id within window


@dataclass(frozen=True)
class _Occurrence:
    """A hit whose window is not settled yet, and the window's characters in the document."""

    hit: Hit
    window_chars: tuple[int, int]


@dataclass
class _Region:
    doc: int
    lo: int
    hi: int
    starts: list[int] = field(default_factory=list)  # candidate character starts
    end: int = 0  # last candidate character end
    margin: int = 0


class TokenScanner:
    """Occurrences of new tokens in documents, with their windows, as whole-document
    tokenisation with the expanded tokenizer gives them.

    `tokenizer` is the expanded `tokenizers.Tokenizer`; token i has id new_start + i and
    surface string `texts[i]`. Built once per mining actor.
    """

    def __init__(self, tokenizer, texts: Sequence[str], new_start: int, snippet_len: int):
        self._tokenizer = tokenizer
        self._texts = list(texts)
        self._new_start = new_start
        self.snippet_len = snippet_len
        self._cuts = Cuts.safe_for(tokenizer)
        # Otherwise whole documents are tokenised: exact for any tokenizer, only slower.
        self.regions = bool(self._cuts.chars) and spells_texts(tokenizer, texts, new_start)
        self._matcher: SurfaceMatcher | None = None
        self.tokenised_chars = 0  # what the scanner paid for, for the report
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)  # CPU seconds, for the report
        self._ids_seen = 0

    def scan(self, docs: Sequence[str], open_indices: Iterable[int],
             quota: int | Sequence[int] | None = None) -> list[Hit]:
        """Every occurrence of an open token in `docs`, ordered by (doc, char_start); with
        `quota` (one for all, or one per token index), only each token's first `quota`
        distinct windows."""
        open_set = frozenset(open_indices)
        if not open_set:
            return []
        with self._phase(SEARCH):
            if self.regions:
                pending = self._candidate_regions(docs, open_set)
            else:
                pending = [_Region(d, 0, len(text)) for d, text in enumerate(docs)]
        found: dict[tuple[int, int], _Occurrence] = {}
        with self._phase(TOKENISE):
            while pending:
                pending = self._resolve(docs, pending, open_set, found)
        with self._phase(SETTLE):
            return self._settled(docs, [found[k] for k in sorted(found)], quota)

    @contextmanager
    def _phase(self, name: str):
        cpu = time.process_time()
        try:
            yield
        finally:
            self.phase_seconds[name] += time.process_time() - cpu

    # ------------------------------------------------------------------ candidates
    def _surface(self, open_set: frozenset[int]) -> SurfaceMatcher:
        """A matcher for at least the open tokens. Tokens fill up during a run, a few at a
        time; building an automaton of tens of thousands of strings costs about what
        scanning a part does, so it is rebuilt only once the open tokens are fewer than
        half of its strings (spans filters out the others' matches)."""
        matcher = self._matcher
        if matcher is None or not open_set <= matcher.indices or 2 * len(open_set) < len(matcher.indices):
            self._matcher = matcher = SurfaceMatcher(self._texts, open_set)
        return matcher

    def _initial_margin(self) -> int:
        """Characters likely to hold half a window, with some slack."""
        chars_per_id = self.tokenised_chars / self._ids_seen if self._ids_seen else 4.0
        return int(1.25 * chars_per_id * (self.snippet_len // 2 + 1)) + 1

    def _candidate_regions(self, docs: Sequence[str], open_set: frozenset[int]) -> list[_Region]:
        matcher, margin = self._surface(open_set), self._initial_margin()
        regions: list[_Region] = []
        for d, text in enumerate(docs):
            doc_regions: list[_Region] = []
            for starts, end in _runs(sorted(matcher.spans(text, open_set)), margin):
                lo, hi = self._cuts.before(text, starts[0] - margin), self._cuts.after(text, end + margin)
                if doc_regions and lo < doc_regions[-1].hi:
                    last = doc_regions[-1]
                    last.hi, last.end = max(last.hi, hi), max(last.end, end)
                    last.starts += starts
                else:
                    doc_regions.append(_Region(d, lo, hi, starts, end, margin))
            regions += doc_regions
        return regions

    # ------------------------------------------------------------------ confirmation
    def _resolve(self, docs, regions: list[_Region], open_set, found: dict) -> list[_Region]:
        """Tokenise the regions, keep their occurrences; return regions to widen."""
        pieces = [docs[r.doc][r.lo : r.hi] for r in regions]
        encodings = self._tokenizer.encode_batch(pieces, add_special_tokens=False)
        retry = []
        for region, piece, encoding in zip(regions, pieces, encodings):
            ids = encoding.ids
            self.tokenised_chars += len(piece)
            self._ids_seen += len(ids)
            occurrences, cramped = self._occurrences(ids, region.lo == 0, region.hi == len(docs[region.doc]), open_set)
            if cramped and self._candidate_cramped(encoding, region, cramped):
                retry.append(self._widen(docs[region.doc], region))
                continue
            for start, (index, window, offset) in occurrences.items():
                key = (region.doc, region.lo + encoding.token_to_chars(start)[0])
                if key not in found:
                    chars = _window_chars(encoding, len(ids), region, start - offset, start - offset + len(window))
                    found[key] = _Occurrence(Hit(region.doc, key[1], index, window, offset), chars)
        return retry

    def _occurrences(self, ids, at_doc_start: bool, at_doc_end: bool, open_set) -> tuple[dict, set[int]]:
        """({position: (token index, window, offset)} of open tokens, windows not yet
        settled; the positions whose window ran into an inner region edge)."""
        n, found, cramped = len(ids), {}, set()
        new_start = self._new_start
        for start in [p for p, token_id in enumerate(ids) if token_id >= new_start]:
            index = ids[start] - new_start
            if index not in open_set:
                continue
            window, offset = window_around(ids, start, 1, self.snippet_len)
            before, after = offset, len(window) - offset - 1
            if (not at_doc_start and before == start) or (not at_doc_end and after == n - start - 1):
                cramped.add(start)
            else:
                found[start] = (index, window, offset)
        return found, cramped

    def _settled(self, docs, occurrences: list[_Occurrence], quota: int | Sequence[int] | None) -> list[Hit]:
        """The hits with their windows settled (trimmed until their text encodes back to
        them; dropped where the token would have to go). With a quota, a token's hits are
        settled only until it has `quota` distinct windows: settling encodes each window
        again, and a frequent token occurs thousands of times in a batch."""
        taken: dict[int, set[tuple[int, ...]]] = {}
        hits = []
        for occurrence in occurrences:
            hit = occurrence.hit
            windows = taken.setdefault(hit.token_index, set())
            if quota is not None and len(windows) >= quota_at(quota, hit.token_index):
                continue
            if self.regions and self._cuts.encodes_back(self._tokenizer, docs[hit.doc], hit.window, *occurrence.window_chars):
                settled = hit.window, hit.token_position
            else:
                settled = settle(self._tokenizer, hit.window, hit.token_position)
            if settled is None or (quota is not None and tuple(settled[0]) in windows):
                continue
            windows.add(tuple(settled[0]))
            hits.append(Hit(hit.doc, hit.char_start, hit.token_index, *settled))
        return hits

    @staticmethod
    def _candidate_cramped(encoding, region: _Region, cramped: set[int]) -> bool:
        """Whether a candidate's first id starts an occurrence whose window ran into an
        inner region edge (occurrences the region was not cut for wait for their own)."""
        for start in region.starts:
            t = next(t for c in range(start - region.lo, region.hi - region.lo) if (t := encoding.char_to_token(c)) is not None)
            if t in cramped:
                return True
        return False

    def _widen(self, text: str, region: _Region) -> _Region:
        margin = region.margin * 2
        lo = self._cuts.before(text, min(region.starts) - margin)
        hi = self._cuts.after(text, region.end + margin)
        return _Region(region.doc, lo, hi, region.starts, region.end, margin)
