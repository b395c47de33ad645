"""The evaluation split over workers, and put back together.

Every worker reads the same held-out text, mines the same snippets and cuts the same
chunks, then takes its part of each metric's work: a run of whole drift batches, a run of
consecutive chunks (`part`). It returns sums (not means) and per-chunk scores; `merge`
hands every part to each registered metric, which adds the sums and concatenates the
scores in chunk order, so that the report is the one a single worker writes (up to the
order of float additions). Part 0 alone measures what is timed or cheap (generation,
compression). Merging needs no model: the driver does it.
"""

from __future__ import annotations

import math

from tokdist_ray.config import EvalConfig
from tokdist_ray.eval.metrics import registered

# "auto" gives each worker at least this many batches of drift or bits-per-byte work:
# fewer would spend more time loading the model than scoring with it
MIN_BATCHES_PER_WORKER = 4


def worker_count(settings: EvalConfig, n_tokens: int, gpus: int) -> int:
    """How many workers evaluate: `eval.num_workers` ("auto": one per GPU, as many as the
    settings give work for, and one on the CPUs when there are no GPUs); never more than
    the GPUs, which would only take turns."""
    if settings.num_workers != "auto":
        return min(settings.num_workers, gpus) if gpus else settings.num_workers
    if not gpus:
        return 1
    snippets = n_tokens * settings.snippets_per_token  # at most; the held-out text may hold fewer
    if settings.max_snippets:
        snippets = min(snippets, settings.max_snippets)
    chunks = settings.bits_per_byte_bytes / settings.chunk_bytes  # at least
    batches = max(math.ceil(snippets / settings.batch_size), math.ceil(chunks / settings.batch_size))
    return max(1, min(gpus, batches // MIN_BATCHES_PER_WORKER))


def part(n_items: int, index: int, count: int, unit: int = 1) -> tuple[int, int]:
    """[lo, hi) of part `index` of `count` consecutive parts of `n_items`, cut at multiples
    of `unit` (a batch size: each part's batches are the undivided run's), as even as that
    allows; later parts may be empty when there are fewer units than parts."""
    units = math.ceil(n_items / unit)
    lo, hi = (units * i // count * unit for i in (index, index + 1))
    return min(lo, n_items), min(hi, n_items)


def merge(parts: list[dict], new_start: int) -> dict:
    """The workers' results (`heldout.score_part`, any order) as eval.json's report: where
    they ran, each registered metric's entries in turn, and what each worker did."""
    parts = sorted(parts, key=lambda p: p["part"])
    metrics = registered()
    report = {"node": parts[0]["node"], "device": parts[0]["device"]}
    for metric in metrics:
        report |= metric.merge(parts, new_start)
    report["workers"] = [_worker(p, metrics) for p in parts]
    return report


def _worker(part: dict, metrics: list) -> dict:
    entry = {"node": part["node"], "device": part["device"]}
    for metric in metrics:
        entry |= metric.work(part)
    return entry
