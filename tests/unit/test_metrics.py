"""The metric registry: a metric registered once is scored, merged, written into eval.json
and eval.md and summarised, with no other wiring."""

import json

import pytest

from tests.helpers import tiny_evaluation
from tokdist_ray.eval import heldout, metrics, shards
from tokdist_ray.eval.compression import Compression
from tokdist_ray.eval.heldout import evaluate_export, score_part


class HeldoutBytes(metrics.Metric):
    """Bytes of held-out documents, each worker summing its share of them."""

    name = "heldout_bytes"

    def score(self, part):
        lo, hi = shards.part(len(part.texts), part.index, part.count)
        return {"heldout_bytes": sum(len(t.encode("utf-8")) for t in part.texts[lo:hi]), "documents": hi - lo}

    def merge(self, parts, new_start):
        return {"heldout_bytes": sum(p["heldout_bytes"] for p in parts)}

    def work(self, part):
        return {"documents": part["documents"]}

    def sections(self, report):
        return [f"## Held-out bytes\n\n{report['heldout_bytes']}"]

    def summary(self, report):
        return {"heldout_bytes": report["heldout_bytes"]}


@pytest.fixture
def registry(monkeypatch):
    """The registered metrics, restored after the test."""
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))


def test_a_registered_metric_is_scored_merged_and_written(registry, tiny_model_dir, job_corpus_dir, tmp_path,
                                                           monkeypatch):
    evaluation = tiny_evaluation(tiny_model_dir(tied=False), job_corpus_dir, bits_per_byte_bytes=0)
    metrics.register(HeldoutBytes())
    # scored in this process, where the metric is registered (Ray workers import the package's own
    # registrations), whether or not an earlier test left the suite's Ray instance running
    monkeypatch.setattr(heldout, "ray_is_running", lambda: False)
    total = sum(len(p.read_bytes()) for p in job_corpus_dir.iterdir())

    summary = evaluate_export(evaluation, tmp_path)
    report = json.loads((tmp_path / "eval.json").read_text())
    page = (tmp_path / "eval.md").read_text()

    assert report["heldout_bytes"] == summary["heldout_bytes"] == total
    assert list(report)[-2:] == ["heldout_bytes", "workers"]  # after the metrics registered before it
    assert report["workers"][0]["documents"] == len(list(job_corpus_dir.iterdir()))
    assert f"## Held-out bytes\n\n{total}" in page
    assert page.index("## Held-out bytes") < page.index("## Drift")  # drift's table closes the page
    halves = shards.merge([score_part(evaluation, 1, 2), score_part(evaluation, 0, 2)], evaluation.expansion.new_start)
    assert halves["heldout_bytes"] == total and [w["documents"] for w in halves["workers"]] == [4, 4]


def test_the_registry_refuses_a_second_metric_of_a_name(registry):
    metrics.register(HeldoutBytes())
    with pytest.raises(ValueError, match="'heldout_bytes' is registered already"):
        metrics.register(HeldoutBytes())
    with pytest.raises(ValueError, match="'compression' is registered already"):
        metrics.register(Compression())
    # eval.json lists the built-in metrics' entries in this order
    assert [m.name for m in metrics.registered()] == ["drift", "compression", "bits_per_byte", "generation",
                                                       "heldout_bytes"]
