"""Bad input gets one line before any work, and nothing broken is ever written: each case
as a user would meet it on the command line or in the API."""

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import WORDS, run_cli, tiny_job_args
from tokdist_ray import DistillationConfig, FileDataSource, TokenDistillation
from tokdist_ray.config import HFDataSource
from tokdist_ray.data.snippets import MiningStats
from tokdist_ray.errors import ConfigError, CorpusError, TrainingDivergedError, user_error_in
from tokdist_ray.training.checkpoint import check_finite


@pytest.fixture
def job(tiny_model_dir, job_corpus_dir, tmp_path, monkeypatch):
    """(args of a small valid job, its run_dir); a local run, whatever the environment says."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = tmp_path / "run"
    return tiny_job_args(tiny_model_dir(), job_corpus_dir, run_dir), run_dir


def with_option(args: list[str], key: str, value: str) -> list[str]:
    args = list(args)
    if f"--{key}" in args:
        args[args.index(f"--{key}") + 1] = value
    else:
        args += [f"--{key}", value]
    return args


def refused(code: int, err: str, *phrases: str) -> str:
    """The one line the user sees; asserts exit 2, no traceback and each phrase in it."""
    assert code == 2, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("tokdist-ray: error: "), err
    for phrase in phrases:
        assert phrase in line, line
    return line


@pytest.mark.parametrize("key, value, phrase", [
    ("training.learning_rate", "inf", "learning_rate must be a finite number > 0, got inf"),
    ("training.learning_rate", "nan", "learning_rate must be a finite number > 0, got nan"),
    ("training.learning_rate", "50", "learning_rate must be at most 1"),
    ("training.max_steps", "0", "max_steps must be an int >= 1 or None (no limit), got 0"),
    ("training.max_steps", "-3", "max_steps must be an int >= 1 or None"),
    ("training.time_budget_s", "-5", "time_budget_s must be a finite number > 0 or None"),
    ("data.num_workers", "-2", "num_workers must be an int >= 1 or None"),
    ("data.paths", "", "paths: '' is not a path"),
    ("eval.heldout_paths", "", "heldout_paths: '' is not a path"),
    ("training.target_layer", "999", "target_layer 999 is out of range for a model with 2 layers"),
    ("distributed.num_workers", "64", "distributed.num_workers 64 x cpus_per_worker 1 needs 64 CPUs"),
    ("tokens.file", "/etc", "token file /etc is a directory"),
    ("distributed.storage_filesystem", "s3", "storage_filesystem must be a pyarrow.fs.FileSystem object, got 's3'; "
                                             "to name remote storage by a string (as a job config must), set "
                                             "storage_path to a URI such as s3://bucket/dir"),
    ("model", "bundled:nope", "there is no bundled model 'bundled:nope'; the bundled model is bundled:smollm2"),
])
def test_what_can_be_known_before_any_work_is_one_line(job, capsys, ray_starts, key, value, phrase):
    args, run_dir = job
    if key == "tokens.file":
        args = [a for a in args if a not in ("--tokens.list", ",".join(WORDS))]
    code, err = run_cli(with_option(args, key, value), capsys)
    refused(code, err, phrase)
    assert not ray_starts
    assert not run_dir.exists(), "nothing may be written for a refused job"


def test_a_lone_surrogate_in_a_tokens_file_is_one_line_before_the_run_starts(job, tmp_path, capsys, ray_starts):
    args, run_dir = job
    tokens = tmp_path / "tokens.json"
    tokens.write_text('[" Krankenwagen", " Kranken\\udc00wagen"]', encoding="utf-8")
    args = [a for a in args if a not in ("--tokens.list", ",".join(WORDS))] + ["--tokens.file", str(tokens)]
    refused(*run_cli(args, capsys), f"tokens.file: {tokens}: entry 2 (' Kranken\\udc00wagen') holds a lone surrogate",
            "write the character itself")
    assert not ray_starts and not run_dir.exists()


@pytest.mark.parametrize("config", ["directory", "alias"])
def test_a_config_file_that_cannot_be_a_job_is_one_line(tmp_path, capsys, config):
    from tokdist_ray.job.cli import main

    path = tmp_path
    if config == "alias":
        path = tmp_path / "job.yaml"
        path.write_text("training: &t {epochs: 2}\noutput_fit: *t\n", encoding="utf-8")
    phrase = "is a directory; name a YAML file" if config == "directory" else "uses a YAML alias (*t) at line 2"
    refused(main(["run", "--config", str(path)]), capsys.readouterr().err, f"config file {path} ", phrase)


def broken_model(source, tmp_path, damage: str):
    """A copy of a saved tiny model with one file damaged as a cut-short download leaves it."""
    model = tmp_path / "broken-model"
    shutil.copytree(source, model)
    weights = model / "model.safetensors"
    if damage == "truncated_data":
        os.truncate(weights, weights.stat().st_size - 100)
    elif damage == "truncated_header":
        os.truncate(weights, 20)
    else:  # config.json cut short
        config = model / "config.json"
        config.write_text(config.read_text()[:40], encoding="utf-8")
    return model


@pytest.mark.parametrize("damage, phrase", [
    ("truncated_data", "model.safetensors is truncated: it has {size} bytes of the {needed} its header describes"),
    ("truncated_header", "model.safetensors is truncated: it has 20 bytes of the {needed} its header describes"),
    ("config_json", "config.json is not valid JSON ("),
])
def test_a_broken_model_file_is_named_before_tokens_and_mining(job, tmp_path, capsys, ray_starts, damage, phrase):
    # found only when a Ray worker loaded the weights, after tokens and mining, naming no file
    args, run_dir = job
    model = broken_model(args[args.index("--model") + 1], tmp_path, damage)
    weights = model / "model.safetensors"
    with open(weights, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    size = weights.stat().st_size
    needed = size + 100 if damage == "truncated_data" else 8 + header
    line = refused(*run_cli(with_option(args, "model", str(model)), capsys), f"model file {model}/",
                   phrase.format(size=size, needed=needed), "download" if damage != "config_json" else "repair it")
    assert not ray_starts and not run_dir.exists()
    with pytest.raises(ConfigError) as api:  # the API refuses it before it loads weights
        TokenDistillation(str(model), device="cpu")
    assert line == f"tokdist-ray: error: {api.value}"


def test_an_export_the_disk_cannot_hold_is_refused_before_any_work(job, capsys, ray_starts, monkeypatch):
    from tokdist_ray import preflight

    args, run_dir = job
    weights = Path(args[args.index("--model") + 1]) / "model.safetensors"
    disk = shutil.disk_usage(run_dir.parent)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: disk._replace(free=weights.stat().st_size))
    line = refused(*run_cli(args, capsys), f"run_dir (its model/ folder): the export into {run_dir / 'model'} needs "
                   "about", f"and its filesystem has {weights.stat().st_size / 1e6:.1f} MB ({weights.stat().st_size} "
                   "bytes) free; free space there or name a directory on a larger disk")
    needed = int(re.search(r"\((\d+) bytes: the model's safetensors shards and a margin\)", line)[1])
    assert weights.stat().st_size < needed < 2 * weights.stat().st_size
    assert not ray_starts and not run_dir.exists()


def test_free_space_is_not_asked_over_an_earlier_export_a_rerun_may_reuse(tiny_model_dir, tmp_path, monkeypatch):
    from tokdist_ray import preflight

    weights = tiny_model_dir() / "model.safetensors"
    out = tmp_path / "model"
    disk = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: disk._replace(free=weights.stat().st_size))
    with pytest.raises(ConfigError, match="shards, its GGUF and a margin"):
        preflight.check_export_space("out_path", out, str(tiny_model_dir()), "f32")
    out.mkdir()
    (out / "new_rows.safetensors").write_bytes(b"")  # what marks a finished export
    preflight.check_export_space("out_path", out, str(tiny_model_dir()), "f32")


def test_an_out_path_that_is_a_file_is_refused_before_distilling(job, tmp_path, capsys, ray_starts):
    args, run_dir = job
    taken = tmp_path / "model.bin"
    taken.write_bytes(b"not a directory")
    refused(*run_cli(with_option(args, "out_path", str(taken)), capsys), f"out_path: {taken} is a file")
    assert not ray_starts and not run_dir.exists()


@pytest.mark.parametrize("where", ["under_a_file", "read_only_filesystem"])
def test_an_unwritable_run_dir_is_one_line(job, tmp_path, capsys, ray_starts, where):
    args, _ = job
    if where == "under_a_file":
        (tmp_path / "plain-file").write_text("x")
        run_dir, phrase = tmp_path / "plain-file" / "run", "which is a file"
    else:  # the tests run as root, for whom permission bits do not stop a write
        run_dir, phrase = "/proc/tokdist-run", "cannot be written"
    line = refused(*run_cli(with_option(args, "run_dir", str(run_dir)), capsys), "run_dir")
    assert phrase in line or "is not writable" in line, line
    assert not ray_starts


def test_a_model_that_needs_remote_code_is_refused_before_any_weights(job, tmp_path, capsys, ray_starts):
    args, _ = job
    custom = tmp_path / "custom-model"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm", "num_hidden_layers": 2,
        "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"},
    }))
    refused(*run_cli(with_option(args, "model", str(custom)), capsys), "needs its own Python code", "trust_remote_code")
    assert not ray_starts
    with pytest.raises(ConfigError, match="needs its own Python code"):
        TokenDistillation(str(custom))


def test_tokens_merges_cannot_make_fail_in_the_tokens_stage_and_are_not_cached(job, capsys, ray_starts):
    args, run_dir = job
    code, err = run_cli(with_option(args, "tokens.list", " New York, Los Angeles"), capsys)
    refused(code, err, "merges can build none of the 2 tokens", "spans_pre_token_boundary")
    assert not ray_starts
    assert not (run_dir / "stages" / "tokens.json").exists(), "a failed tokens stage must not be cached as done"


def test_a_token_of_ten_thousand_characters_is_skipped_at_once(job, capsys, ray_starts):
    args, _ = job
    started = time.perf_counter()
    code, err = run_cli(with_option(args, "tokens.list", " " + "Krankenwagen" * 833), capsys)
    refused(code, err, "too_many_pieces")
    assert time.perf_counter() - started < 120, "the merge planner must not run on it"  # it took > 10 min
    assert not ray_starts


def test_an_interrupted_job_says_how_to_continue(job, capsys, monkeypatch):
    from tokdist_ray.job import pipeline

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_run_stages", interrupted)
    code, err = run_cli(job[0], capsys)
    assert code == 130 and "interrupted" in err and "Run the same command again to continue" in err
    assert "Traceback" not in err


def test_a_diverging_run_stops_with_one_error_and_saves_nothing(tiny_model_dir, job_corpus_dir, tmp_path, monkeypatch):
    from tokdist_ray.training.strategies import Local

    def diverging(self, loss):  # each step as usual, then a row gone to nan
        step(self, loss)
        self.distiller.rows.input.data[0, 0] = float("nan")

    step = Local.backward_and_step
    monkeypatch.setattr(Local, "backward_and_step", diverging)
    out = tmp_path / "out"
    tokdist = TokenDistillation(str(tiny_model_dir()), device="cpu")
    with pytest.raises(TrainingDivergedError, match=r"training diverged: by step 3, \d+ of 17 new input rows hold inf or nan"):
        tokdist.run(WORDS, data=FileDataSource(str(job_corpus_dir)), snippet_len=24, snippets_per_token=4,
                    training=DistillationConfig(batch_size=2), out_path=str(out), save=True)
    assert not out.exists(), "nothing may be saved of a diverged run"


def test_a_user_error_raised_in_a_ray_worker_is_unwrapped():
    class TrainingFailed(RuntimeError):  # the shape of Ray Train's error: rank -> the worker's exception
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    diverged = TrainingDivergedError("training diverged")
    try:
        raise TrainingFailed({0: RuntimeError("wrapped"), 1: diverged})
    except TrainingFailed as e:
        assert user_error_in(e) is diverged
    try:
        raise RuntimeError("task failed") from diverged
    except RuntimeError as e:
        assert user_error_in(e) is diverged
    assert user_error_in(RuntimeError("a bug")) is None


def test_check_finite_names_the_side_and_the_rows():
    rows = {"input": torch.zeros(3, 4), "output": torch.zeros(3, 4)}
    check_finite(rows, 5)
    rows["output"][1, 2] = float("nan")
    with pytest.raises(TrainingDivergedError, match="by step 5, 1 of 3 new output rows hold inf or nan"):
        check_finite(rows, 5)


def test_the_api_checks_its_arguments_before_mining(tiny_model_dir, tmp_path):
    tokdist = TokenDistillation(str(tiny_model_dir()), device="cpu")
    with pytest.raises(ConfigError, match="min_snippets_per_token .5. is more than snippets_per_token .4."):
        tokdist.run(WORDS, data=FileDataSource(str(tmp_path)), snippets_per_token=4, min_snippets_per_token=5)
    with pytest.raises(ConfigError, match="target_layer 999 is out of range"):
        tokdist.run(WORDS, data=FileDataSource(str(tmp_path)), training=DistillationConfig(target_layer=999))
    with pytest.raises(ConfigError, match="paths: '' is not a path"):
        FileDataSource("")


def test_a_loss_given_as_a_string_is_one_loss():
    assert DistillationConfig(loss_methods="MSE-on-hiddens").loss_methods == ("MSE-on-hiddens",)


def test_when_no_row_has_text_the_advice_is_the_text_column():
    stats = MiningStats()
    stats.add_bad("missing_text", 12)
    with pytest.raises(CorpusError, match="none of the corpus's 12 rows has text .* set text_column .* not 'body'"):
        stats.require_text("body")
    stats.documents = 1
    stats.require_text("body")  # one row with text: a short corpus, not a wrong column


def test_the_in_process_miner_names_the_text_column(tiny_model_dir, tmp_path):
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text("\n".join(json.dumps({"content": f"A Krankenwagen, row {i}."}) for i in range(5)))
    tokdist = TokenDistillation(str(tiny_model_dir()), device="cpu")
    with pytest.raises(CorpusError, match="set text_column"):
        tokdist.run(WORDS, data=FileDataSource(str(corpus)), snippets_per_token=2)


def test_hf_text_files_replace_bytes_that_are_not_utf8_like_local_files(tmp_path):
    from tokdist_ray.data.corpus.hub_source import open_stream, stream_values

    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 au lait\nsecond line\n")
    source = HFDataSource("text", data_files=str(path))
    assert list(stream_values(open_stream(source), source)) == ["caf\ufffd au lait", "second line"]


def test_a_ray_task_error_gives_the_user_error_it_carries_not_ray_s_traceback():
    from ray.exceptions import RayTaskError

    from tokdist_ray.errors import CorpusFileError

    cause = CorpusFileError("/data/a.parquet", "cannot be read as parquet")
    wrapped = RayTaskError("read", "Traceback (most recent call last):\n  ...", cause).as_instanceof_cause()
    assert isinstance(wrapped, CorpusFileError) and "pid=" in str(wrapped)  # Ray's message: why the cause is wanted
    assert str(user_error_in(wrapped)) == "corpus file /data/a.parquet: cannot be read as parquet"


def test_ray_s_console_log_of_a_user_error_is_dropped_and_the_error_raised_as_itself(capsys):
    import logging

    from ray.exceptions import RayTaskError

    from tokdist_ray.errors import CorpusFileError, user_errors_from_ray

    logger = logging.getLogger("tokdist-test-ray-data")
    console, kept = logging.StreamHandler(), []
    file_like = logging.Handler()
    file_like.emit = kept.append
    logger.addHandler(console)
    logger.addHandler(file_like)
    cause = CorpusFileError("/data/a.jsonl.gz", "its .gz stream is truncated")
    wrapped = RayTaskError("read", "Traceback (most recent call last):\n  ...", cause).as_instanceof_cause()
    try:
        with pytest.raises(CorpusFileError) as raised, user_errors_from_ray(logger.name):
            try:
                raise wrapped
            except Exception as e:
                logger.error("An exception was raised from a task", exc_info=e)
                logger.error("Exception occurred in Ray Data or Ray Core internal code")  # logged while handling it
                raise
        assert str(raised.value) == str(cause) and raised.value.__suppress_context__
        logger.error("another line")  # the filter is gone after the block
        with pytest.raises(ZeroDivisionError), user_errors_from_ray(logger.name):  # a bug stays a bug, and logged
            try:
                1 / 0
            except ZeroDivisionError as e:
                logger.error("a bug", exc_info=e)
                raise
    finally:
        logger.removeHandler(console)
        logger.removeHandler(file_like)
    err = capsys.readouterr().err
    assert "An exception was raised" not in err and "internal code" not in err and "Traceback" in err
    assert "another line" in err and "a bug" in err
    assert len(kept) == 4, "the file handler keeps every record"


def test_a_gz_truncated_partway_names_the_file_and_the_rows_read_before(tmp_path):
    import gzip

    from tokdist_ray.data.corpus.corpus import documents
    from tokdist_ray.errors import CorpusFileError

    data = gzip.compress("".join(json.dumps({"text": f"row {i} of the corpus"}) + "\n" for i in range(20000)).encode())
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusFileError, match=rf"corpus file {path}: cannot be read after \d+ rows: its .gz stream "
                                              "is truncated; copy or download the file again"):
        list(documents(FileDataSource(str(path))))  # the in-process reader; Ray's read tasks share files.file_values
