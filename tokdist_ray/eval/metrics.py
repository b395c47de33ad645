"""What a held-out metric is, what it reads, and the registry of them.

A metric is one module: a `Metric` that scores its share of the held-out text on a worker
(`score`), puts the workers' shares together into eval.json's entries (`merge`), and
shows them in eval.md (`sections`), as PNG plots (`plots`) and in the stage's summary
(`summary`). It is registered once, in tokdist_ray/eval/__init__.py; the evaluation runs
and reports the registered metrics in registration order, which is the order of their
entries in eval.json.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tokdist_ray.config import SNIPPET_SEED, EvalConfig
from tokdist_ray.vocab.merges import MergeExpansion


@dataclass(frozen=True)
class Evaluation:
    """What the held-out evaluation of one expansion reads."""

    model: str  # the original model, as load_model names it
    expansion: MergeExpansion
    rows: str | dict  # new_rows.safetensors, or its tensors: "input" and, for untied models, "output"
    settings: EvalConfig
    loss_curve: list  # the training's, for the plot
    snippet_len: int = 50
    target_layer: int = -1
    seed: int = SNIPPET_SEED  # of the drift sample
    trust_remote_code: bool = False


@dataclass
class Part:
    """Part `index` of `count` of the evaluation, on one worker, and what its metrics read.
    Every worker reads the same held-out texts; each metric takes its own share of its work
    with `shards.part`, and a metric that must not be split (timed, or cheap) runs on part 0."""

    evaluation: Evaluation
    index: int
    count: int
    model: torch.nn.Module  # one copy per worker; a metric may write a method's new rows into it
    tied: bool  # the model's tables as loaded (writing a method's own output rows unties them)
    original: PreTrainedTokenizerBase  # the original model's tokenizer
    rows: dict[str, torch.Tensor]  # Token Distillation's, on the model's device
    # each method's input rows, taken from the original tables before any metric wrote into them
    methods: dict[str, torch.Tensor]
    texts: list[str]  # the held-out documents
    device: str
    dtype: torch.dtype

    @property
    def label(self) -> str:
        """Progress bars' suffix naming the worker, when there are several."""
        return f", worker {self.index + 1}/{self.count}" if self.count > 1 else ""


class Metric(ABC):
    """One measure of the held-out evaluation. A worker's part is one dict that every
    metric adds its entries to; eval.json is one dict that every metric's `merge` adds to."""

    name: str  # unique among the registered metrics
    page: int = 0  # eval.md's sections and the plots come in increasing `page`, then registration order

    @abstractmethod
    def score(self, part: Part) -> dict:
        """This worker's entries of its part: sums or per-item scores that `merge` can put
        together ({} when it has nothing to measure)."""

    @abstractmethod
    def merge(self, parts: list[dict], new_start: int) -> dict:
        """eval.json's entries from every worker's part, sorted by part; needs no model."""

    def work(self, part: dict) -> dict:
        """What this worker's part held, for eval.json's "workers" list."""
        return {}

    def sections(self, report: dict) -> list[str]:
        """eval.md's sections (markdown) from eval.json's `report`."""
        return []

    def plots(self, report: dict, out_dir: Path) -> list[str]:
        """PNG files written into `out_dir`."""
        return []

    def summary(self, report: dict) -> dict:
        """Entries of the evaluate stage's summary."""
        return {}


METRICS: dict[str, Metric] = {}  # by name, in registration order


def register(metric: Metric) -> Metric:
    """Add `metric` after the registered ones; a second metric of the same name is refused:
    its entries would overwrite the first's in eval.json."""
    if metric.name in METRICS:
        raise ValueError(f"a metric named {metric.name!r} is registered already")
    METRICS[metric.name] = metric
    return metric


def registered() -> list[Metric]:
    return list(METRICS.values())
