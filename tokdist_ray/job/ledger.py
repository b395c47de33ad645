"""The job's record of its stages under `run_dir/stages/`: which finished, with which
inputs (a fingerprint), how long they took, and what they wrote."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from tokdist_ray.atomic import read_json, write_json

log = logging.getLogger("tokdist_ray")


class StageLedger:
    """Which stages finished, with which inputs, how long they took.

    A record is written whole (temp file, then rename) once its stage has finished, and
    names the files under run_dir relative to it, so a run_dir moved or copied elsewhere
    reads its own files. A record that cannot be read is set aside and its stage reruns."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.dir = run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def done(self, stage: str, key: str) -> dict | None:
        record = self._read(stage)
        return record if record is not None and record.get("fingerprint") == key else None

    def run(self, stage: str, key: str, work: Callable[[], dict]) -> dict:
        record = self.done(stage, key)
        if record is not None:
            log.info("stage %s: already done with the same inputs, reusing %s", stage, self.dir / f"{stage}.json")
            self.skipped.append(stage)
            self.timings[stage] = 0.0
            return record["outputs"]
        log.info("stage %s: running", stage)
        start = time.perf_counter()
        outputs = work()
        self.timings[stage] = round(time.perf_counter() - start, 3)
        record = {"fingerprint": key, "seconds": self.timings[stage], "outputs": self.portable(outputs)}
        write_json(self.dir / f"{stage}.json", record)
        return outputs

    def portable(self, outputs: dict) -> dict:
        """`outputs` with the files under run_dir named relative to it."""
        return {k: _relative(v, self.run_dir) if k in PATH_OUTPUTS else v for k, v in outputs.items()}

    def _read(self, stage: str) -> dict | None:
        path = self.dir / f"{stage}.json"
        if not path.is_file():
            return None
        try:
            record = read_json(path)
            outputs = record["outputs"]
        except (ValueError, KeyError, TypeError) as e:  # cut short by a kill, or edited by hand
            aside = path.with_name(f"{path.name}.unreadable")
            path.replace(aside)
            log.warning("stage %s: its record %s is unreadable (%s); set it aside as %s, the stage runs again",
                        stage, path, type(e).__name__, aside.name)
            return None
        record["outputs"] = {k: str(self.run_dir / v) if k in PATH_OUTPUTS else v for k, v in outputs.items()}
        return record


# outputs that name files: kept relative to run_dir in stage records (absolute stays absolute)
PATH_OUTPUTS = ("tokenizer_path", "tokens_path", "snippets_path", "rows_dir", "rows_path", "model_dir", "report_path",
                "gguf_path")


def _relative(path: str, run_dir: Path) -> str:
    return str(Path(path).relative_to(run_dir)) if Path(path).is_relative_to(run_dir) else path
