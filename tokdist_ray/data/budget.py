"""The snippet budget: how many snippets each new token is mined (or generated) for.

`per_token`, the reference's rule: `snippets_per_token` for every token. `by_frequency`: the
same total, snippets_per_token x tokens, spread in proportion to how often each token
occurs in the corpus (its continued-BPE count). Frequent tokens carry most of the bits of
held-out text; a rare one needs its row only roughly placed. Each token gets at least
`low` (the run's min_snippets_per_token, so that none is skipped for want of budget) and
at most HIGH_MULTIPLE x snippets_per_token.

A quota is an int (every token alike) or a mapping token -> snippets."""

from __future__ import annotations

import hashlib
import json
from typing import Mapping, Sequence, Union

import numpy as np

from tokdist_ray.errors import ConfigError

BUDGETS = ("per_token", "by_frequency")
HIGH_MULTIPLE = 10

Quota = Union[int, Mapping[str, int]]


def quota_of(quota: Quota, token: str) -> int:
    return quota if isinstance(quota, int) else quota[token]


def quotas_by_index(quota: Quota, texts: Sequence[str]) -> int | list[int]:
    """What the ledger and the miners take: the int, or one quota per token index."""
    return quota if isinstance(quota, int) else [quota[t] for t in texts]


def quota_at(quota: int | Sequence[int], index: int) -> int:
    return quota if isinstance(quota, int) else quota[index]


def quota_key(quota: Quota) -> int | str:
    """What a cache key and a report say of the quota: the int, or a digest of the mapping."""
    if isinstance(quota, int):
        return quota
    return "by_token:" + hashlib.sha1(json.dumps(sorted(quota.items())).encode()).hexdigest()[:16]


def quota_summary(quota: Quota) -> dict:
    """For the snippets report: the spread of the quotas, not 30,000 numbers."""
    if isinstance(quota, int):
        return {"snippets_per_token": quota}
    values = np.fromiter(quota.values(), np.int64)
    return {"total": int(values.sum()), "min": int(values.min()), "median": float(np.median(values)),
            "max": int(values.max())}


def spread_by_frequency(counts: Mapping[str, int], per_token: int, low: int) -> dict[str, int]:
    """token -> quota, about proportional to its count, within [low, HIGH_MULTIPLE x
    per_token], summing to at most per_token x tokens (the largest scale that fits,
    by bisection: the clipped sum only grows with it)."""
    texts = list(counts)
    c = np.array([counts[t] for t in texts], dtype=np.float64)
    high, total = HIGH_MULTIPLE * per_token, per_token * len(texts)

    def quotas(scale: float) -> np.ndarray:
        return np.clip(np.rint(scale * c), low, high).astype(np.int64)

    lo, hi = 0.0, high / max(c.min(), 1.0)
    for _ in range(64):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if quotas(mid).sum() <= total else (lo, mid)
    return dict(zip(texts, quotas(lo).tolist()))


def snippet_quota(budget: str, tokens: Sequence[str], per_token: int, low: int,
                  counts: Mapping[str, int] | None) -> Quota:
    """The run's quota under `budget`; `counts`: each token's corpus count, where known."""
    if budget == "per_token":
        return per_token
    if budget != "by_frequency":
        raise ConfigError(f"snippets.budget must be one of {list(BUDGETS)}, got {budget!r}")
    missing = [t for t in tokens if not counts or t not in counts]
    if missing:
        raise ConfigError(
            f"snippets.budget: by_frequency needs each new token's corpus count, and {len(missing)} have none "
            f"(e.g. {missing[0]!r}); tokens.from_corpus gives them (continued BPE), or use snippets.budget: per_token")
    return spread_by_frequency({t: max(int(counts[t]), 1) for t in tokens}, per_token, low)
