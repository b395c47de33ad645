"""The job's command line: every user mistake is one clear line and exit code 2, before Ray
starts, never a traceback; one job per run_dir."""

import os

import pytest

from tests.helpers import run_cli, tiny_job_args
from tokdist_ray.job.lock import RunDirLock


def test_a_missing_model_is_named_before_ray_starts(job_corpus_dir, tmp_path, capsys, ray_starts):
    code, err = run_cli(tiny_job_args(tmp_path / "no-such-model", job_corpus_dir, tmp_path / "run"), capsys)
    assert code == 2 and "no-such-model" in err and "Traceback" not in err
    assert not ray_starts


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "job.yaml"
    bad.write_text("model: bundled:smollm2\ntokens:\n  list: [\" Krankenwagen\"\n", encoding="utf-8")
    code, err = run_cli(["--config", str(bad)], capsys)
    assert code == 2 and f"config file {bad} is not valid YAML at line 4" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"),
    ('{"tokens": [" Krankenwagen"]}', "must hold a JSON list of strings"),
    ('[" Krankenwagen"', "Expecting"),
])
def test_a_bad_token_file_is_named_before_ray_starts(tiny_model_dir, job_corpus_dir, tmp_path, capsys, content, problem, ray_starts):
    token_file = tmp_path / "tokens.json"
    if content is not None:
        token_file.write_text(content, encoding="utf-8")
    args = tiny_job_args(tiny_model_dir(), job_corpus_dir, tmp_path / "run")
    args[args.index("--tokens.list"):args.index("--tokens.list") + 2] = ["--tokens.file", str(token_file)]
    code, err = run_cli(args, capsys)
    line = err.splitlines()[-1]
    assert code == 2 and line.startswith("tokdist-ray: error: tokens.file: ") and str(token_file) in line
    assert problem in line
    assert "Traceback" not in err
    assert not ray_starts


@pytest.mark.parametrize("key", ["data.paths", "eval.heldout_paths"])
def test_missing_corpus_paths_are_named_before_ray_starts(tiny_model_dir, job_corpus_dir, tmp_path, capsys, key, ray_starts):
    args = tiny_job_args(tiny_model_dir(), job_corpus_dir, tmp_path / "run")
    args[args.index(f"--{key}") + 1] = str(tmp_path / "no-such-docs")
    code, err = run_cli(args, capsys)
    assert code == 2 and f"{key}: no corpus files match" in err and "no-such-docs" in err
    assert not ray_starts


def test_a_token_list_with_nothing_new_fails_before_ray_starts(tiny_model_dir, job_corpus_dir, tmp_path, capsys, ray_starts):
    args = tiny_job_args(tiny_model_dir(), job_corpus_dir, tmp_path / "run")
    args[args.index("--tokens.list") + 1] = " the, the"  # one id already, then a duplicate
    code, err = run_cli(args, capsys)
    assert code == 2 and "no new tokens left after filtering 2 candidates" in err
    assert "Traceback" not in err
    assert not ray_starts


def test_a_second_job_on_a_busy_run_dir_is_refused(tiny_model_dir, job_corpus_dir, tmp_path, capsys, ray_starts):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):  # the first job, still running
        code, err = run_cli(tiny_job_args(tiny_model_dir(), job_corpus_dir, run_dir), capsys)
    assert code == 2 and f"run_dir {run_dir} is in use by another job (pid {os.getpid()} on " in err
    assert "give this job its own run_dir" in err
    assert not (run_dir / "stages" / "tokens.json").exists(), "the refused job must not touch the run"
    assert not ray_starts
    with RunDirLock(run_dir):  # released when the first job ends
        pass
