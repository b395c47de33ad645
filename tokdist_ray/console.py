"""What a user sees on the terminal: our progress lines, and little else.

`console_logging()` gives the `tokdist_ray` logger one stderr handler. `quiet_third_party()`
sends third-party notices that carry nothing for the user (Ray's actor-constructor
notices, DeepSpeed's accelerator line, known deprecation warnings of libraries we call)
to `run_dir/logs/third_party.log` instead of the terminal; errors still reach the
terminal.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

log = logging.getLogger("tokdist_ray")

# Loggers whose INFO/WARNING lines are noise on a user's terminal; they go to the log file.
NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "ray", "ray.data", "ray.train", "ray.tune", "torch.distributed", "datasets")
# Warnings raised inside libraries, about their own internals.
NOISY_WARNINGS = (
    r".*broadcast_buffers.*",
    r".*torch\.distributed\.reduce_op.*",
    r".*pkg_resources is deprecated.*",
    r".*TRANSFORMERS_CACHE.*",
    r".*`resume_download` is deprecated.*",
)


def console_logging() -> None:
    """Progress lines on stderr, once, unless the application gave our logger a handler.
    (Not conditional on the root logger: Ray and others configure it on import.)"""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[tokdist] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def quiet_third_party(log_dir: str | Path | None = None) -> None:
    """Route third-party INFO/WARNING lines to `log_dir/third_party.log` (or drop them
    below WARNING when there is no run directory) and filter known library warnings.
    Also exported to Ray workers through the environment (see worker_env)."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    handler: logging.Handler | None = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(log_dir) / "third_party.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]:
            old.setLevel(logging.ERROR)
        if handler is not None:
            logger.addHandler(handler)


def worker_env() -> dict[str, str]:
    """Environment for Ray workers that keeps their consoles as quiet as the driver's."""
    return {"PYTHONWARNINGS": ",".join(f"ignore::{kind}" for kind in ("DeprecationWarning", "FutureWarning"))}
