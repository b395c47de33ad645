"""The Python API (in process) and the job (on Ray) run the same stages: on the same small
run they mine the same snippets, train the same rows, fit the same output rows (to fp32
round-off) and export the same files."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.helpers import WORDS, tiny_job_args
from tokdist_ray.config import DistillationConfig, FileDataSource
from tokdist_ray.job.config import load_config, parse_overrides

# report.json sections that say how and where a run ran, not what it made (the snippets and
# the training are compared below without their timings)
HOW_IT_RAN = ("settings", "timings_s", "distributed", "training", "snippets")


def test_the_api_and_the_job_export_the_same_model(ray_session, tiny_model_dir, job_corpus_dir, tmp_path):
    from tokdist_ray.api import TokenDistillation
    from tokdist_ray.job.pipeline import run_job

    model_dir = tiny_model_dir(tied=False)
    job_args = tiny_job_args(model_dir, job_corpus_dir, tmp_path / "run") + ["--distributed.num_workers", "1"]
    run_job(load_config(None, parse_overrides(job_args)), ("tokens", "snippets", "distill", "fit", "export"))
    tokdist = TokenDistillation(str(model_dir), device="cpu")
    tokdist.run(WORDS, out_path=str(tmp_path / "api"), data=FileDataSource(paths=[str(job_corpus_dir)]),
                snippet_len=24, snippets_per_token=4, training=DistillationConfig(batch_size=4), save=True)

    job, api = tmp_path / "run" / "model", tmp_path / "api"
    assert sorted(p.name for p in job.iterdir()) == sorted(p.name for p in api.iterdir())
    for name in ("tokenizer.json", "config.json"):
        assert (job / name).read_text() == (api / name).read_text(), name
    job_report, api_report = (json.loads((d / "report.json").read_text()) for d in (job, api))
    assert "skipped" not in job_report["output_fit"]  # the fit ran, on the text and the mined snippets
    for report in (job_report, api_report):
        report["output_fit"].pop("seconds")
    # what the tokens cost is estimated from the fitted rows: equal to their round-off
    job_pruning, api_pruning = (report["output_fit"].pop("pruning") for report in (job_report, api_report))
    for estimate in ("estimated_bits_per_byte", "estimated_ids_saved_per_byte"):
        assert job_pruning.pop(estimate) == pytest.approx(api_pruning.pop(estimate), rel=1e-4, abs=1e-6)
    assert job_pruning == api_pruning
    for section in set(job_report) | set(api_report):
        if section not in HOW_IT_RAN:
            assert job_report.get(section) == api_report.get(section), section
    job_snippets, api_snippets = job_report["snippets"], api_report["snippets"]
    assert job_snippets["snippets_per_token"] == api_snippets["snippets_per_token"]
    assert job_snippets["snippets"] == api_snippets["snippets"] > 0
    job_curve, api_curve = job_report["training"]["loss_curve"], api_report["training"]["loss_curve"]
    assert [p["step"] for p in job_curve] == [p["step"] for p in api_curve] and job_curve
    # one Ray Train worker and the loop in process take the same steps on the same batches: the
    # same bits. The fit then reads the same text and windows in the same passes, but torch on
    # another thread count sums in another order: the fitted rows agree to fp32 round-off
    new_start = len(AutoTokenizer.from_pretrained(model_dir))
    job_model, api_model = load_file(job / "model.safetensors"), load_file(api / "model.safetensors")
    assert sorted(job_model) == sorted(api_model)
    for name, tensor in job_model.items():
        if name != "lm_head.weight":
            assert torch.equal(tensor, api_model[name]), name
    job_head, api_head = job_model["lm_head.weight"], api_model["lm_head.weight"]
    assert torch.equal(job_head[:new_start], api_head[:new_start])
    torch.testing.assert_close(job_head[new_start:], api_head[new_start:], rtol=0, atol=1e-6)
    job_rows, api_rows = load_file(job / "new_rows.safetensors"), load_file(api / "new_rows.safetensors")
    assert torch.equal(job_rows["input"], api_rows["input"])
    torch.testing.assert_close(job_rows["output"], api_rows["output"], rtol=0, atol=1e-6)
