"""Progress lines of long stages: count, rate and ETA."""

import logging

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
