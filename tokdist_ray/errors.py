"""User errors: one base class, so the CLI and the job print the message and exit
non-zero instead of a traceback.

Raise a `TokdistError` (or a subclass) for anything the user can fix: a config typo, a
missing model or corpus, a token list with nothing new, a busy run directory. The
message says what is wrong and how to fix it. Bugs stay ordinary exceptions. The
subclasses also derive from the built-in error callers caught before the base existed
(ValueError, FileNotFoundError, ...), so `except ValueError` keeps working.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator


class TokdistError(Exception):
    """Something the user can fix; the message names the problem and the fix."""


class ConfigError(TokdistError, ValueError):
    """A config key, type or value that cannot work."""


class ModelNotFoundError(TokdistError, ValueError):
    """The named model is not a local path, a GGUF, a reachable hub id or a bundled model."""


class CorpusError(TokdistError, ValueError):
    """Corpus files that do not exist or cannot be read as a corpus."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """No corpus file matches the given paths."""


class CorpusFileError(CorpusError):
    """One corpus file cannot be read: it lacks the text column, is not what its name
    says, or is truncated. Raised where the file is read, in a Ray Data task or here."""

    def __init__(self, path: str, problem: str):
        super().__init__(path, problem)  # args as the constructor takes them: Ray pickles the error back
        self.path, self.problem = path, problem

    def __str__(self) -> str:
        return f"corpus file {self.path}: {self.problem}"


class NoNewTokensError(TokdistError, ValueError):
    """Every candidate was filtered out, or none was given."""


class TooFewSnippetsError(TokdistError, ValueError):
    """No new token has enough snippets to be distilled."""


class BackendUnavailableError(TokdistError, RuntimeError):
    """The generation backend that was asked for cannot run here."""


class ExportError(TokdistError, ValueError):
    """The model cannot be written in the format asked for (e.g. GGUF for an architecture
    the GGUF export does not know)."""


class RunConflictError(TokdistError, FileExistsError):
    """A run directory or checkpoint run is in use, or holds a run that cannot be continued."""


class TrainingDivergedError(TokdistError, ArithmeticError):
    """Training drove the new rows to inf or nan; nothing of it was saved."""


def user_error_in(error: BaseException) -> TokdistError | None:
    """The TokdistError that `error` wraps, if any: Ray hands an exception raised in a
    worker or a Ray Data task back wrapped (RayTaskError, TrainingFailedError, ...). A
    RayTaskError is also an instance of its cause's class, but its message is Ray's
    traceback: the cause it holds is what is returned."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: the exception raised in the task
        if isinstance(e, TokdistError) and not isinstance(cause, TokdistError):
            return e
        stack += [e.__context__, e.__cause__, cause]  # the last is looked at first
        failures = getattr(e, "worker_failures", None)  # Ray Train: rank -> the worker's exception
        if isinstance(failures, dict):
            stack += list(failures.values())
        if type(e).__name__ == "ActorDiedError" and (raised := _raised_in_actor_init(str(e))) is not None:
            return raised
    return None


def _raised_in_actor_init(message: str) -> TokdistError | None:
    """An actor whose __init__ raised (a vLLM engine that finds no model on its node) dies,
    and Ray's ActorDiedError keeps only the text of what was raised: its last line names
    the error and its message."""
    for line in reversed(message.splitlines()):
        name, sep, text = line.strip().partition(": ")
        module, _, cls = name.rpartition(".")
        error = globals().get(cls) if sep and module == __name__ else None
        if isinstance(error, type) and issubclass(error, TokdistError):
            return error(text)
    return None


class _HideUserErrors(logging.Filter):
    """Drops records about a user error: logged with it, or while it is being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return error is None or user_error_in(error) is None


@contextmanager
def user_errors_from_ray(*loggers: str) -> Iterator[None]:
    """Around the driver's side of Ray work (iterating a Ray Dataset, say): a
    TokdistError raised in a task or actor leaves as itself, so the CLI prints its one
    line, and the console handlers of `loggers` (Ray Data logs such an error's traceback
    twice before it raises it) drop the records about it; file handlers keep them, so
    the session's ray-data.log still has the traceback."""
    hide = _HideUserErrors()
    handlers = [h for name in loggers for h in logging.getLogger(name).handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for handler in handlers:
        handler.addFilter(hide)
    try:
        yield
    except Exception as e:
        if (user_error := user_error_in(e)) is None:
            raise
        raise user_error from None
    finally:
        for handler in handlers:
            handler.removeFilter(hide)


class OutputWriteError(TokdistError, OSError):
    """An output cannot be written where asked: the disk is full or refuses the write, or
    the folder is someone's own (never replaced). What was there is left as it was."""


class RayStartError(TokdistError, RuntimeError):
    """The job's local Ray instance did not start (Ray's start-up timed out, say)."""
