"""User errors: one base class, so the CLI and the job print the message and exit
non-zero instead of a traceback.

Raise a `TokdistError` (or a subclass) for anything the user can fix: a config typo, a
missing model or corpus, a token list with nothing new, a busy run directory. The
message says what is wrong and how to fix it. Bugs stay ordinary exceptions. The
subclasses also derive from the built-in error callers caught before the base existed
(ValueError, FileNotFoundError, ...), so `except ValueError` keeps working.
"""

from __future__ import annotations


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


class NoNewTokensError(TokdistError, ValueError):
    """Every candidate was filtered out, or none was given."""


class TooFewSnippetsError(TokdistError, ValueError):
    """No new token has enough snippets to be distilled."""


class BackendUnavailableError(TokdistError, RuntimeError):
    """The generation backend that was asked for cannot run here."""


class RunConflictError(TokdistError, FileExistsError):
    """A run directory or checkpoint run is in use, or holds a run that cannot be continued."""


class TrainingDivergedError(TokdistError, ArithmeticError):
    """Training drove the new rows to inf or nan; nothing of it was saved."""


def user_error_in(error: BaseException) -> TokdistError | None:
    """The TokdistError that `error` wraps, if any: Ray hands an exception raised in a
    worker or a Ray Data task back wrapped (RayTaskError, TrainingFailedError, ...)."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, TokdistError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)  # Ray Train: rank -> the worker's exception
        if isinstance(failures, dict):
            stack += list(failures.values())
    return None
