"""Snippets: the schema every source writes, windows around an occurrence, and the
statistics of collecting them.

A snippet is `[BOS] + window`, a window being up to `snippet_len` ids around one
occurrence of a new token, in the ids of the expanded tokenizer: what the exported
tokenizer gives the text, every new token in it merged. Near either end of a document
the window borrows context from the other side instead of being dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa

from tokdist_ray.data.budget import Quota, quota_of
from tokdist_ray.data.corpus.files import MISSING_TEXT, NOT_A_STRING
from tokdist_ray.errors import CorpusError

if TYPE_CHECKING:  # keeps transformers out of processes that only need windows (mining actors)
    pass

log = logging.getLogger("tokdist_ray")

SNIPPET_SCHEMA = pa.schema(
    [
        ("token", pa.string()),
        ("token_index", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),  # expanded ids (alignment.PieceAligner gives the teacher's)
        ("token_position", pa.int32()),  # index of the new token's id within input_ids
        ("source", pa.string()),  # "corpus" | "generated"
    ]
)


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] for tokenizers that have one; [] for BOS-less ones such as Qwen's."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def window_around(ids: Sequence[int], start: int, length: int, snippet_len: int) -> tuple[list[int], int]:
    """Up to `snippet_len` ids holding ids[start:start+length], the occurrence centred where
    the document allows; context missing on one side is taken from the other.
    Returns (window, start of the occurrence within the window)."""
    free = max(0, snippet_len - length)
    after_avail = len(ids) - start - length
    before = min(start, free // 2)
    after = min(after_avail, free - before)
    before = min(start, free - after)  # borrow what the end could not give
    lo = start - before
    return list(ids[lo : start + length + after]), before


def settle(tokenizer, window: list[int], offset: int) -> tuple[list[int], int] | None:
    """The window trimmed at its edges until its text encodes back to exactly its ids
    (`tokenizer`: a tokenizers.Tokenizer), with the new token's offset in it; None if
    the token would have to go. A cut can split a UTF-8 character or a whitespace run
    that the pre-tokenizer splits otherwise without the text after it; a snippet's ids
    are then still the document's, but not what its own text encodes to."""
    lo, hi = 0, len(window)
    while lo <= offset < hi:
        ids = window[lo:hi]
        again = tokenizer.encode(tokenizer.decode(ids, skip_special_tokens=False), add_special_tokens=False).ids
        if again == ids:
            return ids, offset - lo
        # the edge whose ids agree for the shorter run is the broken one
        if _common_run(again, ids) <= _common_run(again[::-1], ids[::-1]):
            lo += 1
        else:
            hi -= 1
    return None


def _common_run(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class MiningStats:
    documents: int = 0
    bad_rows: int = 0  # rows without usable text, all reasons
    bad_reasons: dict[str, int] = field(default_factory=dict)  # files.BadRow reasons and "empty"
    bytes: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def add_bad(self, reason: str, count: int = 1) -> None:
        self.bad_rows += count
        self.bad_reasons[reason] = self.bad_reasons.get(reason, 0) + count

    def summary(self) -> str:
        """For the console: documents read and the bad rows skipped, by reason."""
        reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(self.bad_reasons.items()))
        return f"{self.documents} documents, {self.bad_rows} bad rows skipped" + (f" ({reasons})" if reasons else "")

    def require_text(self, text_column: str) -> None:
        """Raise when every row of the corpus lacked text: that is a wrong `text_column` or a
        wrong file far more often than a corpus too small for the tokens."""
        if self.documents or not self.bad_rows:
            return
        fix = (f"set text_column (data.text_column in a job) to the column that holds the text, not {text_column!r}"
               if set(self.bad_reasons) & {MISSING_TEXT, NOT_A_STRING} else "check that these are the corpus files")
        raise CorpusError(f"none of the corpus's {self.bad_rows} rows has text ({self.summary()}); {fix}")

    def short_of(self, quota: Quota) -> dict[str, int]:
        """token -> snippets, of the tokens with fewer than their quota."""
        return {t: c for t, c in self.counts.items() if c < quota_of(quota, t)}

    def shortfall_note(self, quota: Quota, top_up: bool = False) -> str | None:
        """For the console: the tokens left short of `quota` (the first few), and how to
        fill them, or that they will be (`top_up`)."""
        short = self.short_of(quota)
        if not short:
            return None
        first = ", ".join(f"{t!r} {c}" for t, c in list(short.items())[:5])
        wanted = f"{quota} snippets" if isinstance(quota, int) else "their snippet quota"
        note = f"{len(short)} of {len(self.counts)} tokens short of {wanted} ({first}{', ...' if len(short) > 5 else ''})"
        if top_up:
            return f"{note}; topping them up with generated snippets"
        return (f"{note}; generated snippets can fill them: data.top_up_with_generation: true in a job, "
                "top_up_with_generation=True in the API")

    def log_shortfall(self, quota: Quota, top_up: bool = False) -> None:
        """The shortfall note as a warning, or as news when a top-up follows."""
        if note := self.shortfall_note(quota, top_up):
            log.log(logging.INFO if top_up else logging.WARNING, "mining: %s", note)

    def as_dict(self, quota: Quota) -> dict:
        short = self.short_of(quota)
        return {
            "documents": self.documents,
            "bad_rows": self.bad_rows,
            "bad_rows_by_reason": self.bad_reasons,
            "megabytes": round(self.bytes / 1e6, 3),
            "seconds": round(self.seconds, 3),
            "snippets_per_token": self.counts,
            "short_of_quota": short,
        }


def snippets_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SNIPPET_SCHEMA)
