"""The Python API (in process) and the job (on Ray) run the same stages: on the same small
run they mine the same snippets, train the same rows and export the same files."""

import json

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
    for section in set(job_report) | set(api_report):
        if section not in HOW_IT_RAN:
            assert job_report.get(section) == api_report.get(section), section
    job_snippets, api_snippets = job_report["snippets"], api_report["snippets"]
    assert job_snippets["snippets_per_token"] == api_snippets["snippets_per_token"]
    assert job_snippets["snippets"] == api_snippets["snippets"] > 0
    job_curve, api_curve = job_report["training"]["loss_curve"], api_report["training"]["loss_curve"]
    assert [p["step"] for p in job_curve] == [p["step"] for p in api_curve] and job_curve
    # one Ray Train worker and the loop in process take the same steps on the same batches: the same bits
    for file in ("model.safetensors", "new_rows.safetensors"):
        assert (job / file).read_bytes() == (api / file).read_bytes(), file
