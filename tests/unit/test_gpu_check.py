"""bench/gpu_check.sh --dry-run: every stage of the GPU check on the CPU (gloo, the tiny
model), a failing stage stopping the run, and the FLOP count's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STAGES = ["step", "ddp", "zero1", "zero2", "zero3", "resume", "export", "measure"]


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)  # else the JSON would go to $OUT too
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--json", str(tmp_path / "check.json"),
                           *args], capture_output=True, text=True, env=env, timeout=900)
    return done, json.loads((tmp_path / "check.json").read_text())


@pytest.mark.slow
def test_the_dry_run_passes_every_stage(tmp_path):
    done, report = run_check(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [(name, "passed") for name in STAGES]
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["ddp"]["metrics"]["rows_gap"] <= stages["ddp"]["metrics"]["tolerance"]
    assert set(stages["resume"]["metrics"]) == {"ddp", "zero3"}
    assert [m["batch"] for m in stages["measure"]["metrics"]["measurements"]] == [16, 32]
    summary = done.stdout[done.stdout.index("\nstage "):]
    assert all(f"\n{name:8} passed" in summary for name in STAGES), summary
    assert "snippets/s" in summary and "MFU" in summary


@pytest.mark.slow
def test_a_failing_stage_stops_the_run(tmp_path):
    done, report = run_check(tmp_path, "--stages", "ddp,export", "--fail-at", "ddp")
    assert done.returncode == 1
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [
        ("step", "passed"), ("ddp", "failed"), ("export", "not run")]
    assert "failure injected at step 1" in report["stages"][1]["detail"]
    assert "InjectedFailure" in done.stderr  # the rank's traceback
    assert not report["passed"]


def test_the_flop_count_takes_every_decoder_matmul_weight():
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check_measure import LLAMA3_8B, decoder_matmul_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA3_8B)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert decoder_matmul_weights(config) == linear == 6_979_321_856
