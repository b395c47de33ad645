"""What a rerun trusts: stage keys that cover what the inputs hold, stage records and
checkpoint records that are written whole, and set aside (not obeyed, not fatal) when
they cannot be read, and a run_dir that can be moved or copied."""

import json
import logging
import os
import shutil

import pytest

from tokdist_ray.data.mining.mining_cache import read_cache
from tokdist_ray.job.config import config_dict, load_config, parse_overrides
from tokdist_ray.job.ledger import StageLedger
from tokdist_ray.job.pipeline import stage_keys
from tokdist_ray.training.run_manifest import RAY_SNAPSHOT, RunDirectory

STAGE_KEYS = ("tokens", "snippets", "distill", "run", "evaluate")


@pytest.fixture
def inputs(tmp_path):
    """A job's input files: a model folder, a tokens file, a corpus and held-out text."""
    model, corpus, heldout = tmp_path / "model", tmp_path / "corpus", tmp_path / "heldout"
    for folder, name, text in [(model, "config.json", "{}"), (corpus, "a.txt", "Some corpus text."),
                               (heldout, "h.txt", "Some held-out text.")]:
        folder.mkdir()
        (folder / name).write_text(text, encoding="utf-8")
    (tmp_path / "tokens.txt").write_text(" Krankenwagen\n", encoding="utf-8")
    return tmp_path


def _keys(root, *options) -> dict:
    args = ["--model", str(root / "model"), "--tokens.file", str(root / "tokens.txt"), "--data.paths",
            str(root / "corpus"), "--eval.heldout_paths", str(root / "heldout"), "--run_dir", str(root / "run"),
            *options]
    config = load_config(None, parse_overrides(args))
    return stage_keys(config, config_dict(config))


def _rewrite(path, text):
    """The same path with other content (and a later modification time, as an edit has)."""
    path.write_text(text, encoding="utf-8")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


@pytest.mark.parametrize("edit, changed", [
    ("tokens.txt", STAGE_KEYS),  # the tokens feed every stage
    ("model/config.json", STAGE_KEYS),
    ("corpus/a.txt", ("snippets", "distill", "run", "evaluate")),  # a token list needs no corpus
    ("heldout/h.txt", ("evaluate",)),
])
def test_an_input_edited_at_the_same_path_reruns_exactly_the_stages_it_feeds(inputs, edit, changed):
    before = _keys(inputs)
    _rewrite(inputs / edit, "Other text, one byte longer than the first, at the same path.")
    after = _keys(inputs)
    assert [k for k in STAGE_KEYS if before[k] != after[k]] == list(changed)


def test_a_corpus_replaced_at_the_same_path_reruns_token_selection_from_it(inputs):
    options = ("--tokens.file", "", "--tokens.from_corpus", "10")
    before = _keys(inputs, *options)
    _rewrite(inputs / "corpus" / "a.txt", "A new corpus.")
    assert _keys(inputs, *options)["tokens"] != before["tokens"]


def test_unchanged_inputs_keep_every_key(inputs):
    assert _keys(inputs) == _keys(inputs)


def test_a_stage_record_cut_short_is_set_aside_and_its_stage_runs_again(tmp_path, caplog):
    ledger = StageLedger(tmp_path)
    ledger.run("tokens", "k", lambda: {"count": 2})
    record = tmp_path / "stages" / "tokens.json"
    record.write_text(record.read_text()[:20], encoding="utf-8")  # as a kill mid-write left it
    with caplog.at_level(logging.WARNING, logger="tokdist_ray"):
        outputs = StageLedger(tmp_path).run("tokens", "k", lambda: {"count": 3})
    assert outputs == {"count": 3}
    assert "tokens.json is unreadable" in caplog.text and "set it aside as tokens.json.unreadable" in caplog.text
    assert (tmp_path / "stages" / "tokens.json.unreadable").read_text() == '{\n  "fingerprint": "k"'[:20]
    assert json.loads(record.read_text())["outputs"] == {"count": 3}


def test_a_stage_that_fails_leaves_no_record(tmp_path):
    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError):
        StageLedger(tmp_path).run("tokens", "k", fail)
    assert not (tmp_path / "stages" / "tokens.json").exists()
    assert list((tmp_path / "stages").iterdir()) == []  # no temp file left behind either


def test_a_moved_or_copied_run_dir_reads_its_own_files(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "elsewhere" / "model"
    ledger = StageLedger(run)
    outputs = {"tokenizer_path": str(run / "tokenizer"), "model_dir": str(outside), "count": 2}
    ledger.run("tokens", "k", lambda: outputs)
    assert json.loads((run / "stages" / "tokens.json").read_text())["outputs"]["tokenizer_path"] == "tokenizer"

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(run)
    again = StageLedger(copy)
    assert again.run("tokens", "k", lambda: pytest.fail("the copied record should be reused")) == {
        "tokenizer_path": str(copy / "tokenizer"), "model_dir": str(outside), "count": 2}
    assert again.skipped == ["tokens"]


def test_a_missing_mining_report_or_one_cut_short_is_no_cached_result(tmp_path):
    assert read_cache(str(tmp_path)) is None
    (tmp_path / "report.json").write_text('{"snippets": 3', encoding="utf-8")
    assert read_cache(str(tmp_path)) is None
    (tmp_path / "report.json").write_text('{"snippets": 3}', encoding="utf-8")
    assert read_cache(str(tmp_path)) == {"snippets": 3}


def _snapshot(latest: str | None) -> str:
    result = None if latest is None else {"checkpoint_dir_name": latest, "metrics": {}}
    return json.dumps({"ray_version": "2.60.0", "checkpoint_results": [], "latest_checkpoint_result": result})


def test_a_rerun_names_the_checkpoint_ray_resumes_from_not_the_highest_folder(tmp_path):
    run = RunDirectory(str(tmp_path), "distill")
    assert run.resume_step() is None
    for step in (4, 6):  # step 6 was written, but the run was killed before Ray registered it
        (tmp_path / "distill" / f"checkpoint_step_{step:08d}").mkdir(parents=True)
    assert run.resume_step() is None
    (tmp_path / "distill" / RAY_SNAPSHOT).write_text(_snapshot("checkpoint_step_00000004"))
    assert run.resume_step() == 4
    (tmp_path / "distill" / RAY_SNAPSHOT).write_text(_snapshot(None))
    assert run.resume_step() is None


def test_an_unreadable_ray_snapshot_is_set_aside_so_the_run_can_start_again(tmp_path, caplog):
    run = RunDirectory(str(tmp_path), "distill")
    run.claim({"lr": 1}, resume=False)
    snapshot = tmp_path / "distill" / RAY_SNAPSHOT
    snapshot.write_text(_snapshot("checkpoint_step_00000004")[:30])
    with caplog.at_level(logging.WARNING, logger="tokdist_ray"):
        run.claim({"lr": 1}, resume=True)
    assert not snapshot.exists() and (tmp_path / "distill" / f"{RAY_SNAPSHOT}.unreadable").is_file()
    assert "is unreadable" in caplog.text and "starts again from step 0" in caplog.text
    assert run.resume_step() is None


def test_the_snapshot_name_is_ray_trains_own():
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert RAY_SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def test_the_run_manifest_is_written_whole(tmp_path):
    run = RunDirectory(str(tmp_path), "distill")
    run.claim({"lr": 1}, resume=False)
    assert sorted(p.name for p in (tmp_path / "distill").iterdir()) == ["tokdist_run.json"]
    assert json.loads((tmp_path / "distill" / "tokdist_run.json").read_text()) == {"lr": 1}


def test_a_job_rerun_after_the_tokens_file_is_edited_uses_the_new_tokens(tiny_model_dir, job_corpus_dir, tmp_path,
                                                                         ray_starts):
    from tokdist_ray.job.pipeline import run_job

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(" Krankenwagen\n", encoding="utf-8")
    args = ["--model", str(tiny_model_dir()), "--run_dir", str(tmp_path / "run"), "--tokens.file", str(tokens),
            "--data.paths", str(job_corpus_dir)]
    config = load_config(None, parse_overrides(args))
    run_job(config, ("tokens",))
    assert [t["token"] for t in json.loads((tmp_path / "run" / "tokens.json").read_text())["tokens"]][:1] == [
        " Krankenwagen"]
    assert run_job(config, ("tokens",))["stages_reused"] == ["tokens"]

    _rewrite(tokens, " Schmetterling\n")
    again = run_job(config, ("tokens",))
    assert again["stages_reused"] == []
    assert [t["token"] for t in json.loads((tmp_path / "run" / "tokens.json").read_text())["tokens"]][:1] == [
        " Schmetterling"]
