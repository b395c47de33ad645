"""Choosing new tokens from a corpus.

`frequent_fragmented_words`: words (with their leading space) that the tokenizer splits
into many pieces, ranked by the ids they would save.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from transformers import PreTrainedTokenizerBase

from tokdist_ray.vocab.tokens import phrase_ids

_WORD = re.compile(r" ?[^\W\d_]{3,}")


def frequent_fragmented_words(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], top_n: int, min_pieces: int = 3, min_count: int = 1
) -> list[tuple[str, int]]:
    """Candidate new tokens chosen from a corpus: words (with their leading space) that the
    tokenizer splits into at least `min_pieces` ids, ranked by the ids they would save
    (count x (pieces - 1)). Returns [(word, count)]."""
    counts = Counter(m.group(0) for text in texts for m in _WORD.finditer(text))
    scored = []
    for word, count in counts.items():
        if count < min_count:
            continue
        pieces = len(phrase_ids(tokenizer, word))
        if pieces >= min_pieces:
            scored.append((count * (pieces - 1), word, count))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [(word, count) for _, word, count in scored[:top_n]]
