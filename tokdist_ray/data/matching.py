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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import ahocorasick

from tokdist_ray.data.snippets import settle, window_around

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


def spells_texts(tokenizer, texts: Sequence[str], new_start: int) -> bool:
    """Whether every occurrence of a new id is a surface occurrence of its text: no
    normalizer, and each new id decodes to its token's text exactly."""
    if tokenizer.normalizer is not None:
        return False
    return all(tokenizer.decode([new_start + i], skip_special_tokens=False) == t for i, t in enumerate(texts))


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
    window: list[int]  # expanded ids
    token_position: int  # of the new id within window


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
        """Characters likely to hold half a window, with some slack."""
        chars_per_id = self.tokenised_chars / self._ids_seen if self._ids_seen else 4.0
        return int(1.25 * chars_per_id * (self.snippet_len // 2 + 1)) + 1

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
                hits.setdefault(key, Hit(region.doc, key[1], index, window, offset))
        return retry

    def _occurrences(self, ids, at_doc_start: bool, at_doc_end: bool, open_set) -> tuple[dict, set[int]]:
        """({position: (token index, window, offset)} of open tokens, the positions whose
        window ran into an inner region edge)."""
        n, found, cramped = len(ids), {}, set()
        for start, token_id in enumerate(ids):
            index = token_id - self._new_start
            if index < 0 or index not in open_set:
                continue
            window, offset = window_around(ids, start, 1, self.snippet_len)
            before, after = offset, len(window) - offset - 1
            if (not at_doc_start and before == start) or (not at_doc_end and after == n - start - 1):
                cramped.add(start)
            elif settled := settle(self._tokenizer, window, offset):
                found[start] = (index, *settled)
        return found, cramped

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
