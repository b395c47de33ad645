"""The snippet budget: one quota for every token, or a fixed total spread by frequency."""

from __future__ import annotations

import pytest

from tokdist_ray.data.budget import HIGH_MULTIPLE, quota_key, quota_summary, snippet_quota, spread_by_frequency
from tokdist_ray.errors import ConfigError
from tokdist_ray.job.config import SnippetsConfig

# a heavy tail, as continued BPE's counts are
COUNTS = {f" t{i}": 20_000 // (i + 1) for i in range(200)}


def test_a_spread_budget_keeps_the_total_and_follows_frequency():
    quota = spread_by_frequency(COUNTS, per_token=12, low=2)
    values = list(quota.values())
    assert sum(values) <= 12 * len(COUNTS) and sum(values) > 0.97 * 12 * len(COUNTS)
    assert min(values) >= 2 and max(values) == HIGH_MULTIPLE * 12  # the most frequent capped
    assert values == sorted(values, reverse=True)  # more frequent, never fewer snippets
    assert quota[" t10"] > 12 > quota[" t150"]


def test_a_rare_token_keeps_the_floor():
    assert spread_by_frequency({" a": 10**6, " b": 1, " c": 3}, per_token=12, low=2) == {" a": 32, " b": 2, " c": 2}


def test_equal_counts_spread_evenly():
    assert set(spread_by_frequency({" a": 7, " b": 7, " c": 7}, per_token=4, low=1).values()) == {4}


def test_the_budget_rule_and_what_it_needs():
    assert snippet_quota("per_token", list(COUNTS), 12, 1, None) == 12
    spread = snippet_quota("by_frequency", list(COUNTS), 12, 1, COUNTS)
    assert spread == spread_by_frequency(COUNTS, 12, 1)
    with pytest.raises(ConfigError, match="needs each new token's corpus count.*tokens.from_corpus"):
        snippet_quota("by_frequency", [" t0", " other"], 12, 1, COUNTS)
    with pytest.raises(ConfigError, match="snippets.budget must be one of"):
        SnippetsConfig(budget="by_count")


def test_what_a_cache_key_and_the_report_say_of_a_quota():
    spread = spread_by_frequency(COUNTS, 12, 1)
    assert quota_key(12) == 12  # uniform runs keep the cache keys they had
    assert quota_key(spread) == quota_key(dict(reversed(list(spread.items())))) != quota_key({**spread, " t0": 1})
    assert quota_summary(12) == {"snippets_per_token": 12}
    assert quota_summary(spread)["total"] == sum(spread.values())
