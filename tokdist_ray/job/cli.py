"""`tokdist-ray`: one subcommand per stage, sharing the job config.

    tokdist-ray run --config jobs/configs/demo_cpu.yaml --training.epochs 2
    tokdist-ray mine --config ... ; tokdist-ray distill --config ... ; tokdist-ray eval --config ...
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import typing

from tokdist_ray.config import CORPUS_SOURCES
from tokdist_ray.console import quiet_console
from tokdist_ray.errors import ConfigError, TokdistError
from tokdist_ray.job.config import (
    API_ONLY,
    REFERENCE_FLAGS,
    STAGES,
    DataConfig,
    JobConfig,
    load_config,
    parse_overrides,
)

COMMANDS = {  # each runs its stages in order, reusing those finished with the same inputs
    "run": STAGES,
    "mine": ("tokens", "snippets"),
    "generate": ("tokens", "snippets"),
    "distill": ("tokens", "snippets", "distill"),
    "fit": ("tokens", "snippets", "distill", "fit"),
    "export": ("tokens", "snippets", "distill", "fit", "export"),
    "eval": ("tokens", "snippets", "distill", "fit", "evaluate"),
}
HELP = {
    "run": "every stage: select tokens, mine/generate snippets, distill, fit the output rows, export, evaluate",
    "mine": "select tokens and mine corpus snippets (data.source files|hf)",
    "generate": "select tokens and generate snippets with the model (no corpus)",
    "distill": "everything up to the distilled rows (run_dir/rows)",
    "fit": "everything up to the output rows fitted on corpus text (output_fit)",
    "export": "everything up to the expanded model written to out_path",
    "eval": "evaluate the expanded rows on eval.heldout_paths (runs missing stages first)",
}


def option_reference(cls=JobConfig, prefix: str = "", note: str = "") -> list[str]:
    """Every option as `--section.key  (type, default)`, for --help; the data section's
    corpus settings by the source they belong to."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if cls is DataConfig and f.name == "corpus":
            for name, source in CORPUS_SOURCES.items():
                lines += option_reference(source, prefix, f" (source: {name})")
            continue
        if dataclasses.is_dataclass(kind):
            lines += option_reference(kind, f"{prefix}{f.name}.")
            continue
        if not f.init or f.name in API_ONLY:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        type_name = getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
        lines.append(f"  {'--' + prefix + f.name:<40} {type_name}, default {default!r}{note}")
    return lines


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tokdist-ray",
        description="Add new tokens to a causal LM and learn their embeddings by Token Distillation, on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options (YAML keys, overridable as --section.key VALUE):\n" + "\n".join(option_reference())
        + "\n\nReference example.py flags accepted: " + ", ".join(f"--{k}" for k in REFERENCE_FLAGS),
    )
    ap.add_argument("command", choices=list(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in HELP.items()))
    ap.add_argument("--config", help="YAML job config (see jobs/configs/)")
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, Kubernetes, systemd, `ray job stop`), raised where Ctrl-C raises
    KeyboardInterrupt, so that the job stops as it does on Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user mistake prints `tokdist-ray: error: ...` and returns 2, never a traceback."""
    args, rest = parser().parse_known_args(argv)
    quiet_console()  # before Ray and transformers are imported: their logging reads the environment once
    outer = signal.signal(signal.SIGTERM, _terminate)  # raycluster.connect keeps it over Ray's
    try:
        code = _run(args.command, args.config, rest)
    except TokdistError as e:
        print(f"tokdist-ray: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as stop:
        # stopping: Ray may pass the interrupt on again while shutting down, and a second signal
        # would cut short the clean-up of the local instance at exit
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("tokdist-ray: interrupted. Run the same command again to continue: finished stages are reused "
              "and distillation resumes from its last checkpoint.", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    signal.signal(signal.SIGTERM, outer)
    return code


def _run(command: str, config_path: str | None, rest: list[str]) -> int:
    overrides = parse_overrides(rest)
    if command == "generate":
        overrides["data.source"] = "generated"
    config = load_config(config_path, overrides)
    if command == "eval" and not config.eval.heldout_paths:
        raise ConfigError("eval needs eval.heldout_paths (held-out text files)")
    from tokdist_ray.job.pipeline import run_job

    report = run_job(config, COMMANDS[command])
    # the run_dir the job resolved: under `ray job submit` a relative one is in the job's working dir
    print(f"done in {report['wall_seconds']:.1f}s; stages {report['stage_seconds']}; outputs under {report['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
