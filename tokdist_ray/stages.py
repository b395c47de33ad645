"""The stages of an expansion, shared by the Python API (api.py: in process, on the model
it holds) and the job (job/pipeline.py: on Ray, with stage fingerprints and files):

    tokens     expand_tokens                          -> vocab.merges.MergeExpansion
    snippets   collect_snippets                       -> Snippets
    distill    split_by_snippets, then training       -> training.distilled_rows.DistilledRows
    fit        fit_text, then training.fit_hook.OutputFit (on the distillation's workers)
                                                      -> training.distilled_rows.FittedRows
    prune      prune_tokens (with the fit's token values) -> Pruning
    export     report.expansion_report, export.model.save_model -> the expanded model's folder
    evaluate   eval.heldout.evaluate_export           -> eval.json, eval.md

What differs between the two runners is passed in: how snippets are mined and generated,
and where training runs. The rules (which tokens enter as added tokens, when a top-up
runs, which tokens are distilled, how much text the fit reads) live here once, and
report.json's format in report.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from tokdist_ray.config import OutputFitConfig
from tokdist_ray.data.budget import Quota, quota_of
from tokdist_ray.data.corpus.corpus import text_sample
from tokdist_ray.data.snippets import SNIPPET_SCHEMA
from tokdist_ray.vocab.merges import ADDED_TOKENS, SKIP, MergeExpansion, expand_with_merges
from tokdist_ray.vocab.pruning import cannot_prune, corpus_occurrences, prune
from tokdist_ray.vocab.tokens import NewToken, not_distilled_note, skip_counts, tokens_to_distill

log = logging.getLogger("tokdist_ray")

# (tokens short of snippets, how many each lacks, their indices in the run) -> (snippets, GenerationStats):
# a table in SNIPPET_SCHEMA, or snippets left on the cluster (settling.GeneratedSnippets: num_rows, write(dir))
Generate = Callable[[list[NewToken], dict[str, int], list[int]], tuple[object, object]]


def expand_tokens(tokenizer, candidates, mode: str) -> MergeExpansion:
    """The expanded tokenizer. `candidates`: strings, or a target tokenizer, whose tokens
    that merges cannot produce enter as added tokens (a listed string merges cannot
    produce is skipped, and said so)."""
    from transformers import PreTrainedTokenizerBase

    unreachable = ADDED_TOKENS if isinstance(candidates, PreTrainedTokenizerBase) else SKIP
    expansion = expand_with_merges(tokenizer, candidates, mode, unreachable)
    log.info("%d new tokens (%s, %d intermediate, %d candidates skipped: %s)", expansion.n_requested,
             expansion.mode, len(expansion.intermediates), len(expansion.skipped), skip_counts(expansion.skipped))
    return expansion


@dataclass
class Snippets:
    table: pa.Table  # SNIPPET_SCHEMA, mined rows first, then generated ones held in this process
    report: dict  # "mining" and/or "generation", "snippets", "snippets_per_token"
    generated: object | None = None  # generated snippets left on the cluster, after `table` (settling.GeneratedSnippets)

    @property
    def counts(self) -> dict[str, int]:
        """Snippets toward each token's quota."""
        return self.report["snippets_per_token"]


def collect_snippets(expansion: MergeExpansion, quota: Quota, mine: Callable[[], object] | None, generate: Generate,
                     top_up: bool) -> Snippets:
    """Mine (`mine() -> data.mining.mining.MiningResult`, None without a corpus), then generate:
    every token's quota without a corpus, or with `top_up` what mining left short. Generated
    snippets that `generate` leaves on the cluster stay there (`Snippets.generated`)."""
    tokens = expansion.tokens
    tables, report, counts, generated = [], {}, Counter(), None
    shortfall = {t.text: quota_of(quota, t.text) for t in tokens}
    if mine is not None:
        mined = mine()
        report["mining"] = mined.report()
        counts.update(mined.stats.counts)
        tables.append(mined.table())
        shortfall = mined.shortfall if top_up else {}
    if shortfall:
        index = {t.text: i for i, t in enumerate(tokens)}
        todo = [t for t in tokens if t.text in shortfall]
        rows, stats = generate(todo, {t.text: shortfall[t.text] for t in todo}, [index[t.text] for t in todo])
        if isinstance(rows, pa.Table):
            tables.append(rows)
        else:
            generated = rows
        report["generation"] = stats.as_dict(quota) | {"top_up": mine is not None}
        counts.update(stats.counts)
    table = pa.concat_tables([t.cast(SNIPPET_SCHEMA) for t in tables]) if tables else SNIPPET_SCHEMA.empty_table()
    report["snippets"] = table.num_rows + (generated.num_rows if generated is not None else 0)
    report["snippets_per_token"] = {t.text: counts[t.text] for t in tokens}
    return Snippets(table, report, generated)


def split_by_snippets(tokens: Sequence[NewToken], counts: dict[str, int], min_per_token: int,
                      pre_init_strategy: str) -> tuple[list[NewToken], list[dict]]:
    """(tokens to distill, those with fewer than `min_per_token` snippets, which keep
    their pre-initialised rows), said in the log."""
    distilled, not_distilled = tokens_to_distill(tokens, counts, min_per_token)
    if not_distilled:
        log.warning(not_distilled_note(not_distilled, min_per_token, pre_init_strategy))
    return distilled, not_distilled


# the fit's text is spread over at most 64 x text_bytes of the corpus (25 MB by default):
# read again here, as a streamed hub dataset is, it must stay a small share of a large corpus
FIT_MAX_STRIDE = 64


def fit_text(source, settings: OutputFitConfig, snippets_report: dict, expansion: MergeExpansion) -> list[str]:
    """The corpus text the output fit reads (training/output_fit.py), spread over what
    mining read, as much as the new tokens need (settings.occurrences_per_token); none
    with the fit off or without a corpus (generated snippets are each written around
    their token, not text as it comes)."""
    if not settings.enabled:
        return []
    if source is None:
        log.info("output rows are not fitted: the fit needs corpus text, and these snippets are generated")
        return []
    mined = snippets_report.get("mining", {}).get("megabytes", 0) * 1e6
    stride = min(FIT_MAX_STRIDE, max(1, int(mined // settings.text_bytes)))
    occurrences = Occurrences(expansion)
    texts = text_sample(source, settings.text_bytes, stride,
                        enough=lambda chunk: occurrences.add(chunk) >= settings.occurrences_per_token)
    log.info("output fit: %d chunks, %.0f kB of the corpus; the median new token occurs %d times in them", len(texts),
             sum(len(t.encode()) for t in texts) / 1e3, occurrences.median())
    return texts


class Occurrences:
    """How often each new token occurs in the text counted so far, in the expanded
    tokenisation. The median is over the tokens asked for: intermediates that merges
    need may never occur on their own."""

    def __init__(self, expansion: MergeExpansion):
        self.tokenizer, self.new_start = expansion.tokenizer, expansion.new_start
        self.counts = np.zeros(len(expansion.tokens), dtype=np.int64)
        n, added = len(expansion.tokens), len(expansion.added_tokens)
        self.asked = np.r_[0:expansion.n_requested, n - added:n]

    def add(self, text: str) -> float:
        """Count `text` in; the median new token's count so far."""
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        self.counts += np.bincount(ids[ids >= self.new_start] - self.new_start, minlength=len(self.counts))
        return self.median()

    def median(self) -> float:
        return float(np.median(self.counts[self.asked])) if len(self.asked) else 0.0


@dataclass
class Pruning:
    expansion: MergeExpansion  # without the tokens taken out
    rows: dict  # their rows left out too
    report: dict  # report.json's output_fit.pruning
    kept: list[int]  # the kept tokens' indices before pruning

    def fit_summary(self, summary: dict) -> dict:
        """The fit's summary as report.json gives it: the per-token values replaced by the pruning."""
        return {k: v for k, v in summary.items() if k != "token_value"} | {"pruning": self.report}

    def training_record(self, record: dict) -> dict:
        """The training record (distilled_rows.training_record) of the tokens kept."""
        return {**record, "positions_per_token": [record["positions_per_token"][i] for i in self.kept]}


def prune_tokens(expansion: MergeExpansion, rows: dict, fit_summary: dict, settings: OutputFitConfig,
                 corpus_counts: Mapping[str, int] | None = None) -> Pruning:
    """With settings.prune, the expansion without the new tokens that do not pay for
    themselves (the fit's token_value, training/token_value.py) and their rows; else as
    it is. The report says what those tokens cost and save either way. With
    `corpus_counts` (those continued BPE learned the tokens with), how often each occurs
    comes from the whole corpus (vocab/pruning.corpus_occurrences) rather than the fit
    text: bench_pruning.py compares the two, and at 30,000 tokens the corpus's keep the
    rare tokens whose cost the held-back text cannot tell, so the job counts on the fit text."""
    from tokdist_ray.training.token_value import TokenValue  # torch: only where a fit ran

    every = list(range(len(expansion.tokens)))
    record = fit_summary.get("token_value")
    if record is None:
        return Pruning(expansion, rows, {"skipped": "the output fit measured no token values (it did not run)"}, every)
    value = TokenValue.from_record(record)
    occurrences = corpus_occurrences(expansion, corpus_counts or {})
    if occurrences is not None:
        value = value.with_occurrences(occurrences)
    pieces = [t.phrase_ids for t in expansion.tokens]
    drop = value.not_paying(pieces, settings.max_bits_per_saved_id)
    reason = cannot_prune(expansion)
    pruned, keep = prune(expansion, drop) if reason is None and drop else (expansion, every)
    gone = sorted(set(every) - set(keep))
    cost, saved = value.bits_per_byte(), value.ids_saved_per_byte(pieces)
    report = {
        "pruned": settings.prune and reason is None and bool(gone), "max_bits_per_saved_id": settings.max_bits_per_saved_id,
        "occurrences_from": "the fit text" if occurrences is None else "the corpus counts",
        "not_paying": len(drop), "not_paying_but_needed": len(drop) - len(gone),
        # estimated on the held-back text, per byte: what all the new tokens cost and save, and those that go (or would)
        "estimated_bits_per_byte": {"all": round(float(cost.sum()), 6), "taken_out": round(float(cost[gone].sum()), 6)},
        "estimated_ids_saved_per_byte": {"all": round(float(saved.sum()), 6), "taken_out": round(float(saved[gone].sum()), 6)},
        **({"skipped": reason} if reason else {}),
    }
    if not report["pruned"]:
        if settings.prune and reason:
            log.warning("new tokens are not pruned: %s", reason)
        return Pruning(expansion, rows, report, every)
    if not keep:  # the run's work stays usable: nothing is taken out, and the report says why
        reason = (f"no new token pays for itself at output_fit.max_bits_per_saved_id {settings.max_bits_per_saved_id}; "
                  "nothing is taken out (raise it to keep the tokens that cost least)")
        log.warning("new tokens are not pruned: %s", reason)
        return Pruning(expansion, rows, report | {"pruned": False, "skipped": reason}, every)
    log.info("pruning: %d of %d new tokens cost more than %.3g bits per id they save; %d of them stay (kept tokens "
             "are built from them, or their text would still hold a new token), %d are taken out", len(drop),
             len(expansion.tokens), settings.max_bits_per_saved_id, len(drop) - len(gone), len(gone))
    report["tokens_taken_out"] = [{"token": expansion.tokens[i].text, "occurrences": int(value.occurrences[i]),
                                   "bits_per_kb": round(1000 * float(cost[i]), 4)} for i in gone]
    return Pruning(pruned, {name: row[keep] for name, row in rows.items()}, report, keep)
