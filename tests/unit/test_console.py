"""Progress lines of long stages: count, rate and ETA."""

import logging
import os

from tokdist_ray.console import StageProgress


def test_stage_progress_reports_count_and_eta_and_stays_quiet_between_intervals(caplog, monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 20.0, 40.0])
    monkeypatch.setattr("tokdist_ray.console.time.perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="tokdist_ray")
    progress = StageProgress("drift", 10, "snippets", every_s=15.0)  # started at t=0
    progress.advance(2)  # t=1: too soon for a line
    progress.advance(2)  # t=2: too soon
    progress.advance(2)  # t=20: 6 done at 0.3/s, 4 left
    progress.reached(10)  # t=40: the end, after more than an interval
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "drift: 6/10 snippets (0.3/s), elapsed 20s, eta 13s",
        "drift: 10/10 snippets (0.2/s), elapsed 40s, eta 0s",
    ]


def test_mining_progress_bounds_the_time_left_by_the_corpus_size(caplog, monkeypatch):
    from tokdist_ray.data.mining.mining import _progress
    from tokdist_ray.data.mining.quota import QuotaLedger
    from tokdist_ray.data.snippets import MiningStats
    from tokdist_ray.vocab.tokens import NewToken

    monkeypatch.setattr("tokdist_ray.data.mining.mining.time.perf_counter", lambda: 10.0)
    caplog.set_level(logging.INFO, logger="tokdist_ray")
    ledger = QuotaLedger([NewToken(" a", (1, 2)), NewToken(" b", (3, 4))], quota=2, new_start=100)
    stats = MiningStats(documents=40, bytes=2_000_000)
    _progress(stats, ledger, started=0.0, corpus_bytes=10_000_000)  # 0.2 MB/s, 8 MB left
    _progress(stats, ledger, started=0.0)  # a stream of unknown size: no bound
    assert [r.getMessage() for r in caplog.records] == [
        "mining: 40 documents, 0 bad rows skipped, 2.0 MB of 10.0 (0.2 MB/s), 0/2 tokens at quota, at most 40s left",
        "mining: 40 documents, 0 bad rows skipped, 2.0 MB (0.2 MB/s), 0/2 tokens at quota",
    ]


def test_deepspeed_no_gpu_notice_is_dropped_and_other_warnings_kept():
    """The driver imports DeepSpeed (transformers' save_pretrained, through accelerate); on a
    machine without a GPU its accelerator probe printed a warning on stdout."""
    import subprocess
    import sys

    code = (
        "from tokdist_ray.console import quiet_console\n"
        "quiet_console()\n"
        "import deepspeed\n"
        "from deepspeed.utils import logger\n"
        "logger.warning('a real DeepSpeed warning')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr
    assert "a real DeepSpeed warning" in done.stdout


def test_gguf_conversion_draws_no_progress_bar(capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from tokdist_ray.vocab.models import _no_gguf_progress_bar

    with _no_gguf_progress_bar():
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert "Converting" not in capfd.readouterr().err
    for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):  # restored after
        pass
    assert "Converting" in capfd.readouterr().err


def test_ray_notices_forwarded_to_the_driver_are_left_out(monkeypatch):
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    from tokdist_ray.console import drop_ray_notices

    printed = []
    dispatcher = WorkerStandardStreamDispatcher()
    dispatcher.add_handler("ray_print_logs", lambda data: printed.append(data["lines"]))
    monkeypatch.setattr(ray_worker, "global_worker_stdstream_dispatcher", dispatcher)
    drop_ray_notices()
    drop_ray_notices()  # once is enough: a second call wraps nothing again
    notice = ("Task MapWorker(ReadCorpusFiles->MapBatches(SnippetMiner)).submit failed. There are infinite retries "
              "remaining, so the task will be retried. Error: The actor is dead because it was killed by `ray.kill`.")
    watcher = ("[2026-12-02 18:27:09,973 E 15564 15624] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher'"
               " and ID: '04' has constructor arguments in the object store and max_restarts > 0.")
    dispatcher.emit({"lines": [notice, "[tokdist] step 1/2", watcher], "pid": 1, "is_err": True})
    dispatcher.emit({"lines": [notice], "pid": 1, "is_err": True})
    dispatcher.emit({"lines": ["Traceback (most recent call last):"], "pid": 1, "is_err": True})
    assert printed == [["[tokdist] step 1/2"], ["Traceback (most recent call last):"]]
