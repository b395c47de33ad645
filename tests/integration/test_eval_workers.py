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
