"""The evaluate stage on Ray: two workers write the eval.json of one."""

import dataclasses
import json

from tests.helpers import assert_close, tiny_evaluation
from tokdist_ray.eval.heldout import evaluate_export

TIMINGS = ("prefill_s", "prefill_bytes_per_s", "seconds", "bytes_per_s", "steps_per_s")


def test_two_workers_on_cpus_write_the_eval_json_of_one(ray_session, tiny_model_dir, job_corpus_dir, tmp_path):
    one = tiny_evaluation(tiny_model_dir(tied=False), job_corpus_dir, generation_steps=4, generation_prompts=2,
                          prompt_bytes=40)
    two = dataclasses.replace(one, settings=dataclasses.replace(one.settings, num_workers=2))
    summaries = {name: evaluate_export(evaluation, tmp_path / name) for name, evaluation in (("one", one), ("two", two))}
    reports = {name: json.loads((tmp_path / name / "eval.json").read_text()) for name in summaries}

    assert [len(reports[name]["workers"]) for name in ("one", "two")] == [1, 2]
    assert all(w["heldout_snippets"] and w["chunks"] for w in reports["two"]["workers"]), reports["two"]["workers"]
    assert reports["two"]["generation"]["original"]["greedy"]["decode_steps"] > 0  # once, on the first worker
    assert_close(reports["two"], reports["one"], skip=("workers", *TIMINGS))
    assert (tmp_path / "two" / "eval.md").read_text().startswith("## Bits per byte")
    assert summaries["two"]["relative_to_fvt"] == reports["two"]["relative_to_fvt"]["token_distillation"]


def test_a_reused_ray_worker_gets_the_threads_of_the_cpus_its_task_asked_for(ray_session):
    """Ray sets OMP_NUM_THREADS once per worker process: a 2-CPU evaluation task in a worker
    a 1-CPU export task started would run torch on one thread without use_assigned_cpus. Here
    a 1-CPU task in a worker left at 3 threads."""
    import ray

    from tokdist_ray.raycluster import use_assigned_cpus

    def threads(cpus_before: int) -> tuple[int, int]:
        import torch

        torch.set_num_threads(cpus_before)  # the count the worker's first task left
        use_assigned_cpus()
        return torch.get_num_threads(), int(ray.get_runtime_context().get_assigned_resources()["CPU"])

    # one CPU: the suite's instance has two, and a test's actor pool may still hold one
    got, assigned = ray.get(ray.remote(num_cpus=1)(threads).remote(cpus_before=3), timeout=120)
    assert got == assigned == 1
