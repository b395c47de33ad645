"""What a user sees on the terminal: our progress lines, and little else.

`console_logging()` gives the `tokdist_ray` logger one stderr handler (the API calls it).
`quiet_console()` (the CLI and the job call it before Ray starts) keeps third-party notices
that carry nothing for the user off the terminal: Ray's start-up and Ray Data's execution
notices (they stay in Ray's session logs), Ray Train's worker-group notices, model-loading
progress bars in non-interactive runs, DeepSpeed's no-GPU notice in the driver, and known
deprecation warnings raised inside the libraries we call. Errors still reach the terminal.
(`raycluster.connect` keeps Ray's token-authentication notice of a private local instance
off it; `vocab.models` draws no progress bar while it converts a GGUF file.)
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

log = logging.getLogger("tokdist_ray")

# Warnings raised inside libraries about their own internals, not about anything a user set.
LIBRARY_WARNINGS = (
    r".*`use_push_based_shuffle` is deprecated.*",
    r".*`use_polars` is deprecated.*",
    r".*`use_arrow_tensor_v2` is deprecated.*",
    r".*pkg_resources is deprecated.*",
)
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
# Lines Ray forwards from its processes that say nothing a user can act on: Ray Data
# resubmitting to the miners it stopped after mining's early stop, and Ray's note that an
# actor of its own (Ray Train's) could not be restarted if its arguments were lost.
RAY_NOTICES = re.compile(
    r"submit failed\. There are infinite retries remaining.*killed by `ray\.kill`"
    r"|core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (notebooks and test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def console_logging() -> None:
    """Progress lines on stderr, once, unless the application gave our logger a handler.
    (Not conditional on the root logger: Ray and others configure it on import.)"""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[tokdist] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def quiet_worker() -> None:
    """In a Ray worker process: our lines through our own handler, other libraries' INFO
    lines off (Ray Train logs each checkpoint report at INFO on a logger named after its
    source file, which no level setting of Ray's reaches)."""
    console_logging()
    logging.getLogger().setLevel(logging.WARNING)


class _DropDeepSpeedCpuNotice(logging.Filter):
    """DeepSpeed's accelerator probe warns, on stdout, when it finds no GPU. A process that trains
    nothing (the driver imports DeepSpeed only because accelerate looks for a DeepSpeedEngine
    when transformers saves a model) has no use for it; CPU training workers set DS_ACCELERATOR."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def quiet_deepspeed_cpu_notice() -> None:
    """Drop that one notice in this process; any other DeepSpeed warning still shows. A filter,
    not a level: DeepSpeed sets its logger's level itself when it is imported."""
    deepspeed_log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropDeepSpeedCpuNotice) for f in deepspeed_log.filters):
        deepspeed_log.addFilter(_DropDeepSpeedCpuNotice())


def drop_ray_notices() -> None:
    """In the driver, after ray.init: leave out RAY_NOTICES from what Ray forwards of its
    workers' and raylets' output (Ray's session logs keep them). The driver's own C++
    notices bypass Python and still show."""
    from ray._private import worker as ray_worker

    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    if dispatcher is None:  # another Ray version: everything shows
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, _without_notices(handler) if name == "ray_print_logs" else handler)
                               for name, handler in dispatcher.handlers]


def _without_notices(handler):
    if getattr(handler, "drops_ray_notices", False):
        return handler

    def forward(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not RAY_NOTICES.search(line)]
        if lines:
            handler({**data, "lines": lines})

    forward.drops_ray_notices = True
    return forward


def interactive() -> bool:
    return sys.stderr.isatty()


def quiet_console() -> None:
    """Call before Ray and transformers are imported (their logging reads the environment once)."""
    console_logging()
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    os.environ.update(worker_env())
    quiet_deepspeed_cpu_notice()


def worker_env() -> dict[str, str]:
    """Environment for Ray workers (and this process) that keeps consoles quiet: no
    library deprecation warnings, and no download or weight-loading progress bars when
    nobody watches a terminal."""
    env = {"PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}
    if not interactive():
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return env


class StageProgress:
    """Progress lines for a loop of known size: done/total, rate and ETA, at most one line
    per `every_s` seconds, and one at the end when the loop took longer than that."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = 15.0):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done = 0
        self.started = self.last = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.reached(self.done + n)

    def reached(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        finished = self.done >= self.total
        if now - self.last < self.every_s and not (finished and now - self.started >= self.every_s):
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate else float("inf")
        log.info("%s: %d/%d %s (%.1f/s), elapsed %.0fs, eta %.0fs",
                 self.what, self.done, self.total, self.unit, rate, now - self.started, eta)
