"""The evaluation split over workers: the parts, merged, are the undivided run."""

import pytest

from tests.helpers import assert_close, tiny_evaluation
from tokdist_ray.config import EvalConfig
from tokdist_ray.eval.drift import drift_means
from tokdist_ray.eval.heldout import score_part
from tokdist_ray.eval.shards import merge, part, worker_count


def test_two_halves_merged_give_the_drift_and_bits_per_byte_of_one_pass(tiny_model_dir, job_corpus_dir):
    evaluation = tiny_evaluation(tiny_model_dir(tied=False), job_corpus_dir)
    new_start = evaluation.expansion.new_start
    whole = merge([score_part(evaluation)], new_start)
    halves = [score_part(evaluation, 1, 2), score_part(evaluation, 0, 2)]  # in any order
    merged = merge(halves, new_start)

    shares = [(w["heldout_snippets"], w["chunks"]) for w in merged["workers"]]
    assert all(snippets and chunks for snippets, chunks in shares), shares  # each half has its own work
    assert sum(s for s, _ in shares) == whole["heldout_snippets"] and sum(c for _, c in shares) == whole["workers"][0]["chunks"]
    assert "compression" in merged and "compression" not in halves[0]  # the second half measures no compression
    assert_close(merged, whole, skip=("workers",))

    # the halves' positions differ, so a mean of their means is not the mean: sums had to be merged
    means = [drift_means(half["drift"]) for half in halves]
    positions = [m["token_distillation"]["overall"]["positions"] for m in means]
    assert positions[0] != positions[1]
    naive = sum(m["token_distillation"]["overall"]["kl"] for m in means) / 2
    assert naive != pytest.approx(whole["methods"]["token_distillation"]["overall"]["kl"], rel=1e-5)


def test_parts_are_consecutive_whole_batches_covering_everything():
    for n, count, unit in [(10, 2, 4), (11, 3, 1), (5, 4, 2), (0, 2, 3), (16, 4, 16)]:
        spans = [part(n, i, count, unit) for i in range(count)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(lo % unit == 0 for lo, _ in spans)
    assert [part(10, i, 2, 4) for i in range(2)] == [(0, 4), (4, 10)]
    assert [part(5, i, 4, 2) for i in range(4)] == [(0, 0), (0, 2), (2, 4), (4, 5)]


def test_worker_count_is_one_per_gpu_while_each_gets_a_few_batches():
    small = EvalConfig(snippets_per_token=2, batch_size=4, bits_per_byte_bytes=16_000, chunk_bytes=1000)
    assert worker_count(small, n_tokens=2000, gpus=0) == 1  # CPUs: one worker, as the demo runs
    assert worker_count(small, n_tokens=2000, gpus=8) == 8
    assert worker_count(small, n_tokens=4, gpus=8) == 1  # 2 batches of drift, 4 of bits per byte
    assert worker_count(EvalConfig(max_snippets=48, batch_size=4), n_tokens=10_000, gpus=8) == 3
    assert worker_count(EvalConfig(num_workers=3), n_tokens=4, gpus=0) == 3  # a number is taken as given
    assert worker_count(EvalConfig(num_workers=3), n_tokens=4, gpus=2) == 2  # never more than the GPUs
