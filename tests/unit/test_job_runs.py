"""Runs of the job: one job per run_dir (an OS lock that a second job finds at once and a
killed job never leaves behind), and which checkpoint run a rerun continues."""

import subprocess
import sys

import pytest

from tokdist_ray.errors import RunConflictError
from tokdist_ray.job.config import config_dict, load_config, parse_overrides
from tokdist_ray.job.lock import RunDirLock
from tokdist_ray.job.pipeline import distill_keys, stage_keys

HOLD = (
    "import sys, time; from pathlib import Path; from tokdist_ray.job.lock import RunDirLock; "
    "lock = RunDirLock(Path(sys.argv[1])).__enter__(); print('held', flush=True); time.sleep(120)"
)


def test_a_killed_job_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunConflictError, match=f"in use by another job \\(pid {holder.pid} on "):
            with RunDirLock(tmp_path):
                pass
    finally:
        holder.kill()  # as a job killed by the scheduler: no cleanup runs
        holder.wait()
    with RunDirLock(tmp_path):  # the kernel dropped the dead job's lock
        pass


def test_new_settings_make_a_new_checkpoint_run_and_budgets_continue_the_same_one():
    def keys(*options):
        args = ["--tokens.list", " a", "--data.paths", "docs", *options]
        return distill_keys(config_dict(load_config(None, parse_overrides(args))), "snippets-key")

    stage, run = keys()
    assert keys("--training.learning_rate", "5e-3")[1] != run  # a new run, the old one kept
    assert keys("--distributed.num_workers", "2")[1] != run
    longer, same_run = keys("--training.time_budget_s", "600")
    assert same_run == run and longer != stage  # reruns the stage: trains on from the last checkpoint
    for option, value in [("training.log_every", "1"), ("distributed.max_failures", "3"),
                          ("distributed.checkpoint_every", "5"), ("distributed.resume", "true"),
                          ("out_path", "elsewhere"), ("output_fit.text_bytes", "1000")]:
        assert keys(f"--{option}", value) == (stage, run), option


@pytest.mark.parametrize("option, value, rerun", [
    ("training.learning_rate", "5e-3", {"distill", "run", "fit", "export", "evaluate"}),
    ("training.time_budget_s", "600", {"distill", "fit", "export", "evaluate"}),  # the same checkpoint run
    ("output_fit.text_bytes", "1000", {"fit", "export", "evaluate"}),  # refits the finished run's rows
    ("out_path", "elsewhere", {"export"}),
    ("output.gguf", "true", {"export"}),
    ("eval.chunk_bytes", "3000", {"evaluate"}),
    ("eval.num_workers", "3", set()),  # how many share the evaluation: the same result
])
def test_a_setting_reruns_exactly_the_stages_it_feeds(option, value, rerun):
    def keys(*options):
        config = load_config(None, parse_overrides(["--tokens.list", " a", "--data.paths", "docs",
                                                    "--eval.heldout_paths", "docs", *options]))
        return stage_keys(config, config_dict(config))

    before, after = keys(), keys(f"--{option}", value)
    assert {stage for stage in before if before[stage] != after[stage]} == rerun
