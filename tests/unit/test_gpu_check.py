"""bench/gpu_check.sh --dry-run: every stage of the GPU check on the CPU (gloo, tiny
models), a failing stage stopping the run; and, fast, its parts: the FLOP count, the GPU
peaks MFU is taken against, the fp32 check of the training state, the rows' gap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
STAGES = ["step", "ddp", "zero1", "zero2", "zero3", "resume", "export", "fit", "eval", "rows", "measure"]
FP32 = {"rows": ["float32"], "grads": ["float32"], "moments": ["float32"]}


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
    assert all(stages[name]["metrics"]["precision"] == FP32 for name in ("step", "ddp", "zero1", "zero2", "zero3"))
    assert set(stages["resume"]["metrics"]) == {"ddp", "zero3"}
    fit = stages["fit"]["metrics"]
    assert fit["held_back_loss_best"] < fit["held_back_loss_start"] and fit["rows_per_step"] == 16
    assert stages["eval"]["metrics"]["heldout_snippets"] > 0
    [wide] = stages["rows"]["metrics"]["measurements"]
    assert wide["n_new"] == 30_000 and wide["precision"] == FP32
    assert [m["batch"] for m in stages["measure"]["metrics"]["measurements"]] == [16, 32]
    assert report["peak_tflops"] == "unknown"  # a CPU: no MFU
    summary = done.stdout[done.stdout.index("\nstage "):]
    assert all(f"\n{name:8} passed" in summary for name in STAGES), summary
    assert "snippets/s" in summary and "MFU against an unknown peak" in summary and " unknown " in summary


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
    from gpu_check_measure import LLAMA3_8B, decoder_matmul_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA3_8B)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert decoder_matmul_weights(config) == linear == 6_979_321_856


def test_only_trained_output_rows_add_their_backward_to_the_flop_count():
    from gpu_check_measure import LLAMA3_8B, StepCounts, step_flops
    from transformers import LlamaConfig

    config, counts = LlamaConfig(**LLAMA3_8B), StepCounts(n_teacher=800, n_student=500, n_skipped=300, k=24, q=30)
    fixed, trained = (step_flops(config, 30_000, counts, trains) for trains in (False, True))
    assert trained - fixed == 2 * config.hidden_size * 30_000 * counts.k


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_mfu_is_taken_against_the_gpus_dense_bf16_peak_or_none(monkeypatch, name, peak):
    from gpu_check_measure import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0), None) == peak
    assert peak_tflops(torch.device("cuda", 0), 500.0) == 500.0  # --peak-tflops wins
    assert peak_tflops(torch.device("cpu"), None) is None


def test_the_precision_probe_catches_rows_grads_or_moments_that_are_not_fp32():
    from gpu_check_runs import PrecisionProbe, require_fp32

    from tokdist_ray.training.step import NewRows

    def stepped(rows: NewRows) -> dict:
        distiller = torch.nn.Module()
        distiller.rows = rows
        strategy = type("Strategy", (), {"optimizer": torch.optim.AdamW(rows.parameters(), lr=0.1)})()
        probe = PrecisionProbe(distiller)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the step runs under bf16
            loss = (torch.ones(2, 4) @ rows.input.T).float().square().sum()
        loss.backward()
        strategy.optimizer.step()
        return probe.report(strategy)

    fp32 = stepped(NewRows(torch.randn(3, 4), torch.randn(3, 4)))  # first_piece's fixed output rows: a buffer
    assert fp32 == FP32
    require_fp32(fp32, "fp32 masters")
    with pytest.raises(AssertionError, match="bfloat16"):
        require_fp32(stepped(NewRows(torch.randn(3, 4)).bfloat16()), "bf16 rows")
    with pytest.raises(AssertionError, match="none seen"):
        require_fp32({**FP32, "grads": []}, "no backward")


def test_a_table_training_left_as_it_was_must_come_back_exactly():
    from gpu_check_runs import rows_gap

    initial = {"input": torch.zeros(2, 3), "output": torch.ones(2, 3)}
    reference = {"input": torch.full((2, 3), 1.0), "output": torch.ones(2, 3)}  # output rows fixed (first_piece)
    assert rows_gap({"input": torch.full((2, 3), 1.1), "output": torch.ones(2, 3)}, reference, initial) == pytest.approx(0.1)
    assert rows_gap({"input": torch.ones(2, 3), "output": torch.ones(2, 3) + 1e-6}, reference, initial) == float("inf")
