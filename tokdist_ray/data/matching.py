"""Find new phrases in documents: surface strings first, token ids to confirm.

Tokenising the corpus is what mining costs, and most of a corpus holds none of the new
words. So the raw text is searched for the tokens' surface strings with one Aho-Corasick
automaton, and only a *region* around each candidate is tokenised. The match is then
confirmed on token ids, with the same greedy longest-match rule the merge uses in
training (PhraseMerger), so a snippet is exactly what whole-document tokenisation gives.

Why a region's ids are the document's ids: regions start and end at *cuts* (Cuts): a
single space between two non-space characters, or a line break after a letter or digit.
Byte-level BPE pre-tokenisers (GPT-2, Llama 3, Qwen, SmolLM) never put such a character
into one pre-token with the character before it, and BPE merges stay inside pre-tokens,
so the document's ids split at every cut. `Cuts.safe_for` keeps the rules that hold for
the tokenizer at hand on a probe text, and `spells_texts` checks that an id occurrence
is a surface occurrence; where either fails, PhraseScanner tokenises whole documents
(still exact, only slower).

A region yields an occurrence only where it cannot differ from the whole document:
  - the greedy scan is in step with the scan from the document's start: it starts at a
    position no phrase match can straddle (matches from before the region end before
    position max_phrase_len - 1);
  - the longest-match lookahead sees max_phrase_len ids, or the document's end;
  - the window did not run into a region edge that lies inside the document (there the
    document could have given more context, and window_around would have taken it).
A candidate whose occurrence is not trusted gets a wider region on the next round. A
region's margin starts at what a window needs, converted to characters with the
running characters-per-id of this corpus, and doubles on each miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import ahocorasick

from tokdist_ray.data.snippets import window_around
from tokdist_ray.vocab.alignment import PhraseMerger

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

    def after(self, text: str, y: int) -> int:
        """The first cut at or after y, else the document end."""
        best = len(text)
        for char in self.chars:
            p = text.find(char, max(0, y), best)
            while p != -1 and not self.is_cut(text, p):
                p = text.find(char, p + 1, best)
            best = best if p == -1 else p
        return best


def spells_texts(tokenizer, texts: Sequence[str], phrases: Sequence[Sequence[int]]) -> bool:
    """Whether every id occurrence of a phrase is a surface occurrence of its text: no
    normalizer, and each phrase decodes to its token's text exactly."""
    if tokenizer.normalizer is not None:
        return False
    return all(tokenizer.decode(list(p), skip_special_tokens=False) == t for t, p in zip(texts, phrases))


class SurfaceMatcher:
    """Aho-Corasick over raw text for the surface strings of the open tokens."""

    def __init__(self, texts: Sequence[str], open_indices: Iterable[int]):
        self._automaton = ahocorasick.Automaton()
        for index in open_indices:
            self._automaton.add_word(texts[index], len(texts[index]))
        self._empty = len(self._automaton) == 0
        if not self._empty:
            self._automaton.make_automaton()

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character spans of every surface match, ordered by end."""
        if self._empty:
            return []
        return [(end + 1 - length, end + 1) for end, length in self._automaton.iter(text)]


@dataclass(frozen=True)
class Hit:
    """One occurrence: the document, where it starts (in characters) and its snippet."""

    doc: int
    char_start: int
    token_index: int
    window: list[int]
    phrase_start: int  # within window


@dataclass
class _Region:
    doc: int
    lo: int
    hi: int
    starts: list[int] = field(default_factory=list)  # candidate character starts
    end: int = 0  # last candidate character end
    margin: int = 0


@dataclass
class _Scan:
    """What one region settles: positions [first, last] are exact; occurrences there by
    start, and the starts whose windows ran into an inner region edge."""

    first: int
    last: int
    occurrences: dict[int, tuple[int, list[int], int]] = field(default_factory=dict)
    cramped: set[int] = field(default_factory=set)


class PhraseScanner:
    """Occurrences of new phrases in documents, with their windows, as whole-document
    tokenisation and PhraseMerger's greedy longest match would find them.

    `tokenizer` is a `tokenizers.Tokenizer`; token i has surface string `texts[i]` and
    original ids `phrases[i]`. Built once per mining actor.
    """

    def __init__(self, tokenizer, texts: Sequence[str], phrases: Sequence[Sequence[int]], snippet_len: int):
        self._tokenizer = tokenizer
        self._texts = list(texts)
        self._merger = PhraseMerger(phrases, range(len(phrases)))
        self._phrase_starts = {int(p[0]) for p in phrases}
        self._max_phrase = max(len(p) for p in phrases)
        self.snippet_len = snippet_len
        self._cuts = Cuts.safe_for(tokenizer)
        # Otherwise whole documents are tokenised: exact for any tokenizer, only slower.
        self.regions = bool(self._cuts.chars) and spells_texts(tokenizer, texts, phrases)
        self._matcher: SurfaceMatcher | None = None
        self._matcher_open: frozenset[int] | None = None
        self.tokenised_chars = 0  # what the scanner paid for, for the report
        self._ids_seen = 0

    def scan(self, docs: Sequence[str], open_indices: Iterable[int]) -> list[Hit]:
        """Every occurrence of an open token in `docs`, ordered by (doc, char_start)."""
        open_set = frozenset(open_indices)
        if not open_set:
            return []
        if self.regions:
            pending = self._candidate_regions(docs, open_set)
        else:
            pending = [_Region(d, 0, len(text)) for d, text in enumerate(docs)]
        hits: dict[tuple[int, int], Hit] = {}
        while pending:
            pending = self._resolve(docs, pending, open_set, hits)
        return [hits[k] for k in sorted(hits)]

    # ------------------------------------------------------------------ candidates
    def _surface(self, open_set: frozenset[int]) -> SurfaceMatcher:
        if open_set != self._matcher_open:  # tokens fill up during a run: drop their strings
            self._matcher, self._matcher_open = SurfaceMatcher(self._texts, open_set), open_set
        return self._matcher

    def _initial_margin(self) -> int:
        """Characters likely to hold half a window plus a lookahead, with some slack."""
        chars_per_id = self.tokenised_chars / self._ids_seen if self._ids_seen else 4.0
        return int(1.25 * chars_per_id * (self.snippet_len // 2 + self._max_phrase)) + 1

    def _candidate_regions(self, docs: Sequence[str], open_set: frozenset[int]) -> list[_Region]:
        matcher, margin = self._surface(open_set), self._initial_margin()
        regions: list[_Region] = []
        for d, text in enumerate(docs):
            doc_regions: list[_Region] = []
            for start, end in sorted(matcher.spans(text)):
                lo, hi = self._cuts.before(text, start - margin), self._cuts.after(text, end + margin)
                if doc_regions and lo < doc_regions[-1].hi:
                    last = doc_regions[-1]
                    last.hi, last.end = max(last.hi, hi), max(last.end, end)
                    last.starts.append(start)
                else:
                    doc_regions.append(_Region(d, lo, hi, [start], end, margin))
            regions += doc_regions
        return regions

    # ------------------------------------------------------------------ confirmation
    def _resolve(self, docs, regions: list[_Region], open_set, hits: dict) -> list[_Region]:
        """Tokenise the regions, keep their trusted occurrences; return regions to widen."""
        pieces = [docs[r.doc][r.lo : r.hi] for r in regions]
        encodings = self._tokenizer.encode_batch(pieces, add_special_tokens=False)
        retry = []
        for region, piece, encoding in zip(regions, pieces, encodings):
            ids = encoding.ids
            self.tokenised_chars += len(piece)
            self._ids_seen += len(ids)
            scan = self._trusted_occurrences(ids, region.lo == 0, region.hi == len(docs[region.doc]), open_set)
            if scan is None or not self._candidates_settled(encoding, region, scan):
                retry.append(self._widen(docs[region.doc], region))
                continue
            for start, (index, window, offset) in scan.occurrences.items():
                key = (region.doc, region.lo + encoding.token_to_chars(start)[0])
                hits.setdefault(key, Hit(region.doc, key[1], index, window, offset))
        return retry

    def _trusted_occurrences(self, ids, at_doc_start: bool, at_doc_end: bool, open_set) -> _Scan | None:
        """Open tokens' occurrences where the greedy scan is in step and the lookahead
        whole; None if no part of the region is."""
        n = len(ids)
        scan = _Scan(0 if at_doc_start else self._in_step_from(ids, self._max_phrase - 1),
                     n - 1 if at_doc_end else n - self._max_phrase)
        if scan.first > scan.last and not (at_doc_start and at_doc_end):
            return None
        for start, length, index in self._merger.occurrences(ids[scan.first :]):
            start += scan.first
            if start > scan.last:
                break
            if index not in open_set:
                continue
            window, offset = window_around(ids, start, length, self.snippet_len)
            before, after = offset, len(window) - offset - length
            if (not at_doc_start and before == start) or (not at_doc_end and after == n - start - length):
                scan.cramped.add(start)
            else:
                scan.occurrences[start] = (index, window, offset)
        return scan

    def _in_step_from(self, ids: list[int], earliest: int) -> int:
        """First position >= earliest that no phrase match starting before it covers: the
        greedy scan from the document start visits it, so from here both scans agree."""
        reach = 0
        for p, token_id in enumerate(ids):
            if p >= earliest and reach <= p:
                return p
            if token_id in self._phrase_starts:
                match = self._merger.longest_match(ids, p)
                if match is not None:
                    reach = max(reach, p + match[1])
        return len(ids)

    @staticmethod
    def _candidates_settled(encoding, region: _Region, scan: _Scan) -> bool:
        """Whether every candidate's first id lies where the scan is exact, and does not
        start an occurrence whose window ran into an inner region edge."""
        for start in region.starts:
            t = next(t for c in range(start - region.lo, region.hi - region.lo) if (t := encoding.char_to_token(c)) is not None)
            if not scan.first <= t <= scan.last or t in scan.cramped:
                return False
        return True

    def _widen(self, text: str, region: _Region) -> _Region:
        margin = region.margin * 2
        lo = self._cuts.before(text, min(region.starts) - margin)
        hi = self._cuts.after(text, region.end + margin)
        return _Region(region.doc, lo, hi, region.starts, region.end, margin)
