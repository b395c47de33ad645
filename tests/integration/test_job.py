"""The job: config validation, resumable stages, `ray job submit` against a local head,
and the cluster YAMLs."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import WORDS, tiny_job_args
from tokdist_ray.job.config import load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
ALL_STAGES = ["tokens", "snippets", "distill", "fit", "export", "evaluate"]


def test_job_stages_are_reused_and_a_lost_stage_reruns(ray_session, tiny_model_dir, job_corpus_dir, tmp_path):
    from tokdist_ray.job.pipeline import run_job

    model_dir = tiny_model_dir(tied=False)
    config = load_config(None, parse_overrides(tiny_job_args(model_dir, job_corpus_dir, tmp_path / "run")))
    first = run_job(config)
    assert first["stages_reused"] == []
    eval_md = (tmp_path / "run" / "eval" / "eval.md").read_text()
    assert "bits/byte" in eval_md and "hidden MSE" in eval_md
    bits = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["bits_per_byte"]["methods"]
    assert set(bits) == {"original", "token_distillation", "fvt", "adapti-vocab", "mean_embedding"}
    assert bits["token_distillation"]["tokens_per_byte"] < bits["original"]["tokens_per_byte"]
    assert all((tmp_path / "run" / "eval" / p).stat().st_size > 0
               for p in ("drift_per_token.png", "loss_curve.png", "generation.png"))
    generation = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["generation"]
    assert generation["original"]["greedy"]["decode_steps"] == generation["expanded"]["greedy"]["decode_steps"] > 0
    assert "new_token_share" in generation["expanded"]["sampled"] and "Generation from held-out prompts" in eval_md
    again = run_job(config)
    assert again["stages_reused"] == ALL_STAGES
    # as if the job died during distillation: its stage record never got written
    (tmp_path / "run" / "stages" / "distill.json").unlink()
    third = run_job(config)
    # distillation reruns, resuming from its final checkpoint; identical rows keep the later stages
    assert third["stages_reused"] == ["tokens", "snippets", "fit", "export", "evaluate"]
    record = json.loads((tmp_path / "run" / "rows" / "training.json").read_text())
    assert record["distributed"]["resumed_from_steps"], "the rerun should resume from the final checkpoint"

    # a new output-fit setting refits the finished run's rows on its workers: no training step again
    distilled = (tmp_path / "run" / "rows" / "distilled_rows.safetensors").read_bytes()
    refit = run_job(load_config(None, parse_overrides(
        tiny_job_args(model_dir, job_corpus_dir, tmp_path / "run") + ["--output_fit.max_steps", "7"])))
    assert refit["stages_reused"] == ["tokens", "snippets", "distill"]
    fit = json.loads((tmp_path / "run" / "stages" / "fit.json").read_text())["outputs"]["summary"]
    reported = json.loads((tmp_path / "run" / "model" / "report.json").read_text())["output_fit"]
    # report.json has the fit's summary, the per-token values replaced by what pruning made of them
    assert {k: v for k, v in reported.items() if k != "pruning"} == {k: v for k, v in fit.items() if k != "token_value"}
    new_ids = json.loads((tmp_path / "run" / "tokens.json").read_text())["new_ids"]
    assert len(fit["token_value"]["occurrences"]) == new_ids and reported["pruning"]["max_bits_per_saved_id"] == 0.5
    assert (tmp_path / "run" / "rows" / "distilled_rows.safetensors").read_bytes() == distilled
    # a new out_path exports again, and only that
    moved_out = run_job(load_config(None, parse_overrides(
        tiny_job_args(model_dir, job_corpus_dir, tmp_path / "run") + ["--output_fit.max_steps", "7", "--out_path",
                                                                      str(tmp_path / "elsewhere")])))
    assert moved_out["stages_reused"] == ["tokens", "snippets", "distill", "fit", "evaluate"]
    assert (tmp_path / "elsewhere" / "new_rows.safetensors").read_bytes() == \
        (tmp_path / "run" / "model" / "new_rows.safetensors").read_bytes()

    # a finished run with a new setting is a new run: no error, fresh checkpoints, new rows
    rows_before = (tmp_path / "run" / "model" / "new_rows.safetensors").read_bytes()
    changed = load_config(None, parse_overrides(
        tiny_job_args(model_dir, job_corpus_dir, tmp_path / "run") + ["--training.learning_rate", "5e-3"]))
    fourth = run_job(changed)
    assert fourth["stages_reused"] == ["tokens", "snippets"]
    report = json.loads((tmp_path / "run" / "model" / "report.json").read_text())
    assert report["settings"]["training"]["learning_rate"] == 5e-3 and report["distributed"]["resumed_from_steps"] == []
    assert (tmp_path / "run" / "model" / "new_rows.safetensors").read_bytes() != rows_before
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2, "the first run's checkpoints stay"

    # a run_dir copied elsewhere reads its own files, the original gone: nothing reruns
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    shutil.rmtree(tmp_path / "run")
    moved = run_job(load_config(None, parse_overrides(
        tiny_job_args(model_dir, job_corpus_dir, copy) + ["--training.learning_rate", "5e-3"])))
    assert moved["stages_reused"] == ALL_STAGES
    assert moved["outputs"]["export"]["model_dir"] == str(copy / "model")

    # pruning reads the values the fit measured: a new threshold refits nothing, and exports and evaluates again
    # (one no saving token exceeds: only tokens that occur nowhere and build no kept token go)
    pruned = run_job(load_config(None, parse_overrides(tiny_job_args(model_dir, job_corpus_dir, copy) + [
        "--training.learning_rate", "5e-3", "--output_fit.max_bits_per_saved_id", "1e9"])))
    assert pruned["stages_reused"] == ["tokens", "snippets", "distill", "fit"]
    report = json.loads((copy / "model" / "report.json").read_text())
    taken_out = report["output_fit"]["pruning"].get("tokens_taken_out", [])
    assert all(t["occurrences"] == 0 for t in taken_out)
    assert len(report["tokens_added"]) == new_ids - len(taken_out)
    assert len(AutoTokenizer.from_pretrained(copy / "model")) == \
        AutoModelForCausalLM.from_pretrained(copy / "model").get_input_embeddings().weight.shape[0]


def test_too_few_snippets_is_one_line_not_a_traceback(ray_session, tiny_model_dir, job_corpus_dir, tmp_path, capsys):
    from tokdist_ray.job.cli import main

    args = tiny_job_args(tiny_model_dir(), job_corpus_dir, tmp_path / "run")
    code = main(["run", *args, "--data.max_docs", "2", "--snippets.min_snippets_per_token", "4"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and re.match(r"tokdist-ray: error: none of the \d+ new tokens has 4 snippet\(s\)", line), line


def _submit(command, env):
    """`ray job submit`, retried while the head's job agent is still starting."""
    for _ in range(30):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in done.stderr:
            return done
        time.sleep(3)
    return done


def test_ray_job_submit_produces_a_loadable_model(ray_head, ray_session, tiny_model_dir, job_corpus_dir, tmp_path):
    """Submitted with token authentication on, as the README sets it up, beside another Ray
    instance on the host (ray_session's)."""
    address, env = ray_head
    model_dir = tiny_model_dir(tied=True)
    run_dir = tmp_path / "run"
    args = tiny_job_args(model_dir, job_corpus_dir, run_dir)
    submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
              "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".git"]}),
              "--", sys.executable, "jobs/expand_vocab.py", *args]
    done = _submit(submit, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"outputs under {run_dir}\n" in done.stdout
    # Ray Train's placement-group cleaner finds the job's cluster, not every Ray instance on the host
    assert "Found multiple active Ray instances" not in done.stdout

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    n_old = len(AutoTokenizer.from_pretrained(model_dir))
    for i, word in enumerate(WORDS):
        assert tok(word, add_special_tokens=False)["input_ids"] == [n_old + i]
    assert torch.equal(model.get_input_embeddings().weight[:n_old], original.get_input_embeddings().weight[:n_old])
    report = json.loads((run_dir / "model" / "report.json").read_text())
    assert [t["token"] for t in report["tokens_added"][: len(WORDS)]] == WORDS
    assert set(report["snippets"]["snippets_per_token"]) == {t["token"] for t in report["tokens_added"]}
    assert report["tokenizer"]["mode"] == "merges" and len(tok) == n_old + len(report["tokens_added"])

    resubmitted = _submit(submit, env)
    assert resubmitted.returncode == 0, resubmitted.stderr[-3000:]
    job = json.loads((run_dir / "job.json").read_text())
    assert job["stages_reused"] == ALL_STAGES
