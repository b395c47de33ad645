"""The job's command line: every user mistake is one clear line and exit code 2, before Ray
starts, never a traceback; one job per run_dir."""

import subprocess
import sys

import pytest

from tests.helpers import tiny_job_args
from tokdist_ray.errors import ConfigError
from tokdist_ray.job.cli import main as cli_main
from tokdist_ray.job.config import load_config, parse_overrides
from tokdist_ray.job.lock import RunDirLock


def run_cli(args, capsys) -> tuple[int, str]:
    code = cli_main(["run", *args])
    return code, capsys.readouterr().err


def assert_ray_not_started():
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_config_errors_name_the_key_and_the_fix(tiny_model_dir, job_corpus_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(None, parse_overrides(["--training.learnig_rate", "1e-4", "--tokens.list", " a"]))
    with pytest.raises(ConfigError, match="training.epochs: expected an integer, got 'two'"):
        load_config(None, parse_overrides(["--training.epochs", "two", "--tokens.list", " a"]))
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(None, {})
    config = load_config(None, parse_overrides(["--model_path", "m", "--new_tokens", " Krankenwagen, Schmetterling",
                                                "--dataset_path", "HuggingFaceFW/fineweb-2", "--epochs", "3"]))
    assert (config.model, config.tokens.list, config.data.source, config.training.epochs) == (
        "m", [" Krankenwagen", " Schmetterling"], "hf", 3)
    missing = tiny_job_args(tmp_path / "no-such-model", job_corpus_dir, tmp_path / "run")
    assert cli_main(["run", *missing]) == 2
    assert "no-such-model" in capsys.readouterr().err




def test_yaml_syntax_errors_name_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "job.yaml"
    bad.write_text("model: bundled:smollm2\ntokens:\n  list: [\" Krankenwagen\"\n", encoding="utf-8")
    code, err = run_cli(["--config", str(bad)], capsys)
    assert code == 2 and f"config file {bad} is not valid YAML at line 4" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("key", ["data.paths", "eval.heldout_paths"])
def test_missing_corpus_paths_are_named_before_ray_starts(tiny_model_dir, job_corpus_dir, tmp_path, capsys, key):
    args = tiny_job_args(tiny_model_dir(), job_corpus_dir, tmp_path / "run")
    args[args.index(f"--{key}") + 1] = str(tmp_path / "no-such-docs")
    code, err = run_cli(args, capsys)
    assert code == 2 and f"{key}: no corpus files match" in err and "no-such-docs" in err
    assert_ray_not_started()


def test_a_token_list_with_nothing_new_fails_before_ray_starts(tiny_model_dir, job_corpus_dir, tmp_path, capsys):
    args = tiny_job_args(tiny_model_dir(), job_corpus_dir, tmp_path / "run")
    args[args.index("--tokens.list") + 1] = " the, the"  # one id already, then a duplicate
    code, err = run_cli(args, capsys)
    assert code == 2 and "no new tokens left after filtering 2 candidates" in err
    assert "Traceback" not in err
    assert_ray_not_started()


def test_a_second_job_on_a_busy_run_dir_is_refused(tiny_model_dir, job_corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):  # the first job, still running
        code, err = run_cli(tiny_job_args(tiny_model_dir(), job_corpus_dir, run_dir), capsys)
    assert code == 2 and f"run_dir {run_dir} is in use by another job" in err and "pid" in err
    assert not (run_dir / "stages" / "tokens.json").exists(), "the refused job must not touch the run"
    with RunDirLock(run_dir):  # released when the first job ends
        pass


def test_parsing_a_config_imports_neither_torch_nor_transformers(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("tokens:\n  list: [' Krankenwagen']\ndata:\n  paths: [docs]\n", encoding="utf-8")
    code = (
        "import sys; from tokdist_ray.job.config import load_config; "
        f"load_config({str(config)!r}, {{'training.learning_rate': '1e-3'}}); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
