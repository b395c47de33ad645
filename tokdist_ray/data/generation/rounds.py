"""Which samples each token keeps, as refill rounds decide it, without a round per engine start.

The rule (every backend's): round 0 asks for a token's `wanted` samples 0..n-1; each later
round (up to `refill_rounds`) asks for as many fresh samples as the token still lacks,
continuing the sample indices; a sample cut at EOS before `min_new_tokens` is short and not
kept. So a token's rounds cover the contiguous samples [0, end), and it keeps exactly the
samples in that range that are not short: the result depends on each sample's own short
flag alone, not on how the samples were split into passes of the engines.

The Ray backend therefore generates in passes, not rounds: the first pass asks for
`wanted` samples plus `overgenerate` spares for each token, so that the rounds can usually
be settled from its samples alone; only a token whose shorts outrun its spares needs
another pass. Every pass starts the engines (tens of seconds to minutes for a large model
on vLLM), a spare costs one sample's decode: with `overgenerate: 0` the passes are exactly
the rounds.

The ledger keeps, per token, how many samples were generated and the indices of the short
ones (8 bytes per short sample): the driver holds no sample itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenRounds:
    wanted: int
    generated: int = 0  # samples 0..generated-1 exist
    short: list[int] = field(default_factory=list)  # indices of short samples, any order

    def bounds(self, refill_rounds: int) -> tuple[list[int], int | None]:
        """(round boundaries [0, b1, ..., end], None) once the generated samples settle every
        round; else (the boundaries so far, the sample index the next pass must reach)."""
        short = np.sort(np.asarray(self.short, dtype=np.int64))
        bounds, kept = [0], 0
        for _ in range(1 + refill_rounds):
            missing = self.wanted - kept
            if missing <= 0:
                break
            lo, hi = bounds[-1], bounds[-1] + missing
            if hi > self.generated:
                return bounds, hi
            kept += missing - int(np.searchsorted(short, hi) - np.searchsorted(short, lo))
            bounds.append(hi)
        return bounds, None


@dataclass
class RoundLedger:
    """Per token index: what was generated, and (once settled) the round boundaries."""

    wanted: dict[int, int]  # token index -> samples wanted
    refill_rounds: int
    may_drop: bool  # min_new_tokens > 0: samples can be short, rounds can refill
    overgenerate: float = 0.0
    tokens: dict[int, TokenRounds] = field(init=False)

    def __post_init__(self):
        self.tokens = {i: TokenRounds(n) for i, n in self.wanted.items() if n > 0}

    def most(self, index: int) -> int:
        """The most samples a token's rounds can ever ask for."""
        return self.tokens[index].wanted * (1 + (self.refill_rounds if self.may_drop else 0))

    def next_pass(self) -> dict[int, tuple[int, int]]:
        """token index -> the sample range [lo, hi) to generate next; empty once settled."""
        ranges = {}
        for index, token in self.tokens.items():
            _, needed = token.bounds(self.refill_rounds)
            if needed is None:
                continue
            spare = math.ceil(self.overgenerate * (needed - token.generated)) if self.may_drop else 0
            ranges[index] = (token.generated, min(self.most(index), needed + spare))
        return ranges

    def record(self, ranges: dict[int, tuple[int, int]], short: dict[int, list[int]]) -> None:
        """A pass generated `ranges`; `short` lists, per token index, its short samples there."""
        for index, (lo, hi) in ranges.items():
            token = self.tokens[index]
            assert token.generated == lo, (index, token.generated, lo)
            token.generated = hi
            token.short.extend(short.get(index, ()))

    def cuts(self) -> dict[int, list[int]]:
        """token index -> round boundaries [0, b1, ..., end]: the token keeps its samples
        below `end` that are not short; a sample in [b_r, b_r+1) belongs to round r."""
        cuts = {}
        for index, token in self.tokens.items():
            bounds, needed = token.bounds(self.refill_rounds)
            assert needed is None, f"token {index} is not settled"
            cuts[index] = bounds
        return cuts

    def kept(self) -> dict[int, int]:
        """token index -> samples kept (before the expanded tokenizer's check)."""
        return {index: end - sum(1 for s in self.tokens[index].short if s < end)
                for index, (*_, end) in self.cuts().items()}

    def samples(self) -> int:
        return sum(t.generated for t in self.tokens.values())


def round_of(bounds: list[int], sample_index: int) -> int:
    """The round whose range [bounds[r], bounds[r+1]) holds the sample."""
    return int(np.searchsorted(np.asarray(bounds), sample_index, side="right")) - 1
