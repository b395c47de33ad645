"""The job's config: unknown keys, wrong types and bad values fail at parse time with the
key and the fix; parsing imports neither torch nor transformers."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tokdist_ray.errors import ConfigError
from tokdist_ray.job.config import load_config, parse_overrides


def parse(*args: str):
    return load_config(None, parse_overrides([*args, "--tokens.list", " a", "--data.paths", "docs"]))


def test_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        parse("--training.learnig_rate", "1e-4")
    with pytest.raises(ConfigError, match="training.epochs: expected an integer, got 'two'"):
        parse("--training.epochs", "two")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(None, {})
    config = load_config(None, parse_overrides(["--model_path", "m", "--new_tokens", " Krankenwagen, Schmetterling",
                                                "--dataset_path", "HuggingFaceFW/fineweb-2", "--epochs", "3"]))
    assert (config.model, config.tokens.list, config.data.source, config.training.epochs) == (
        "m", [" Krankenwagen", " Schmetterling"], "hf", 3)


@pytest.mark.parametrize("option, value, message", [
    ("training.learning_rate", "-1", "training: learning_rate must be a finite number > 0"),
    # inf and nan pass a `<= 0` check; an infinite learning rate trained rows to nan
    ("training.learning_rate", "inf", "training: learning_rate must be a finite number > 0, got inf"),
    ("training.learning_rate", "nan", "training: learning_rate must be a finite number > 0, got nan"),
    ("training.max_steps", "-3", "training: max_steps must be an int >= 1 or None (no limit), got -3"),
    ("training.max_steps", "0", "training: max_steps must be an int >= 1 or None (no limit), got 0"),
    ("training.time_budget_s", "-5", "training: time_budget_s must be a finite number > 0 or None"),
    ("data.num_workers", "-2", "data: num_workers must be an int >= 1 or None (no limit), got -2"),
    # an empty path would read the current directory, .git/ included
    ("eval.heldout_paths", "", "eval: heldout_paths: '' is not a path"),
    ("distributed.cpus_per_worker", "nan", "distributed: cpus_per_worker must be a finite number > 0, got nan"),
    ("generation.temperature", "inf", "generation: temperature must be a finite number > 0, got inf"),
    ("training.loss_methods", "MSE", "training: unknown loss method(s) ['MSE']"),
    ("distributed.num_workers", "0", "distributed: DistributedConfig.num_workers must be an int >= 1"),
    ("output.emb_policy", "random", "output: output_emb_policy must be one of"),
    ("output.pre_init_strategy", "mean", "output: pre_init_strategy must be one of"),
    ("snippets.snippet_len", "0", "snippets: snippet_len must be an int >= 1, got 0"),
    ("eval.batch_size", "0", "eval: batch_size must be an int >= 1, got 0"),
    ("eval.generation_rounds", "0", "eval: generation_rounds must be an int >= 1, got 0"),
    ("output_fit.snippets_per_token", "-1", "output_fit: output_fit.snippets_per_token must be an int >= 0 (0: none), got -1"),
    ("eval.max_snippets", "0", "eval: max_snippets must be an int >= 1 or None (no limit), got 0"),
    ("eval.num_workers", "0", "eval: num_workers must be 'auto' or an int >= 1, got 0"),
    ("eval.num_workers", "many", "eval: num_workers must be 'auto' or an int >= 1, got 'many'"),
    ("eval.baselines", "[adapti-vocab]", "eval: eval.baselines must be a list of ['fvt', 'adapti-vocab', 'mean_embedding'] with 'fvt'"),
    ("eval.baselines", "[fvt, bpe]", "eval: eval.baselines must be a list of"),
    ("tokens.tokenizer_mode", "addedtokens", "tokens: tokens.tokenizer_mode: 'addedtokens' is not allowed"),
    ("tokens.selection", "freq", "tokens: tokens.selection: 'freq' is not allowed; choose one of ['bpe', 'words']"),
    ("snippets.min_snippets_per_token", "101", "snippets: min_snippets_per_token (101) is more than snippets_per_token"),
])
def test_a_bad_value_names_its_section_and_key(option, value, message):
    with pytest.raises(ConfigError) as caught:
        parse(f"--{option}", value)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("paths", ["", "docs, "])
def test_an_empty_corpus_path_is_refused_not_read_as_the_current_directory(paths):
    with pytest.raises(ConfigError, match="data: paths: '.*' is not a path"):
        load_config(None, parse_overrides(["--tokens.list", " a", "--data.paths", paths]))


def test_parsing_a_config_imports_neither_torch_nor_transformers(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("tokens:\n  list: [' Krankenwagen']\ndata:\n  paths: [docs]\n", encoding="utf-8")
    code = (
        "import sys; from tokdist_ray.job.config import load_config; "
        f"load_config({str(config)!r}, {{'training.learning_rate': '1e-3'}}); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("source, value", [("list", " Krankenwagen"), ("file", "tokens.txt"),
                                           ("target_tokenizer", "some/tokenizer"), ("from_corpus", "50")])
def test_a_token_source_on_the_command_line_replaces_the_files(tmp_path, source, value):
    path = tmp_path / "job.yaml"
    path.write_text("tokens:\n  from_corpus: 200\n  min_pieces: 4\ndata:\n  paths: [docs]\n", encoding="utf-8")
    tokens = load_config(str(path), {f"tokens.{source}": value}).tokens
    given = {k: getattr(tokens, k) for k in ("list", "file", "target_tokenizer", "from_corpus") if getattr(tokens, k)}
    assert list(given) == [source] and tokens.min_pieces == 4


@pytest.mark.parametrize("text", ["- model: m\n", "just a string\n", "tokens: [' a']\n"])
def test_a_config_file_that_is_not_a_mapping_is_one_clear_error(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path), {"tokens.list": " a"})


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "jobs" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_job_config_loads(path):
    config = load_config(str(path))
    assert config.model and config.run_dir


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    # each alias is a full copy once walked (config_dict, the stage keys): this took 120 s and 1.3 GB
    lines = ["distributed:", "  deepspeed_config:", "    a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=re.escape(f"config file {path} uses a YAML alias (*a0) at line 4, column 14; "
                                                    "job configs allow none: write the value out")):
        load_config(str(path), {"tokens.list": " a", "data.paths": "docs"})
    assert time.perf_counter() - started < 1


def test_a_merge_key_is_an_alias_too(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("base: &base {epochs: 2}\ntraining:\n  <<: *base\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"uses a YAML alias \(\*base\) at line 3"):
        load_config(str(path))


def test_a_config_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=f"^config file {tmp_path} is a directory; name a YAML file"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("value", ["s3", {"type": "s3"}])
def test_a_storage_filesystem_in_a_job_config_asks_for_a_uri(tmp_path, value):
    # a string passed here and failed two stages on, when Ray Train was handed it
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"distributed": {"storage_path": "bucket/dir", "storage_filesystem": value}}))
    with pytest.raises(ConfigError, match=re.escape(
            f"distributed: DistributedConfig.storage_filesystem must be a pyarrow.fs.FileSystem object, got {value!r}; "
            "to name remote storage by a string (as a job config must), set storage_path to a URI such as "
            "s3://bucket/dir and leave storage_filesystem out")):
        load_config(str(path), {"tokens.list": " a", "data.paths": "docs"})


def test_the_api_takes_a_pyarrow_filesystem():
    import pyarrow.fs

    from tokdist_ray.config import DistributedConfig

    fs = pyarrow.fs.LocalFileSystem()
    assert DistributedConfig(storage_path="/tmp/x", storage_filesystem=fs).storage_filesystem is fs


def test_a_token_that_is_not_utf8_on_the_command_line_is_refused():
    # the shell passes a byte that is not UTF-8 as a lone surrogate (surrogateescape); the run failed on it late
    with pytest.raises(ConfigError, match=re.escape("tokens: tokens.list: entry 2 (' Kranken\\udcffwagen') holds a "
                                                    "lone surrogate, which is no character")):
        load_config(None, parse_overrides(["--tokens.list", " a, Kranken\udcffwagen", "--data.paths", "docs"]))
