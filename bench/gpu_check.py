"""One prepared run of the GPU paths on one GPU, without Ray (bench/gpu_check.sh runs it).

Stages, in order; the first that fails stops the run. Every training run uses the job's
default output policy (first_piece: an untied model's new output rows fixed) and checks
that the training state is fp32 under bf16: the rows, their gradients and the optimizer's
moments (gpu_check_runs.PrecisionProbe).

    step     the single-process loop (strategies.Local) in bf16 on a tiny random Llama:
             loss finite and lower in the last epoch than in the first
    ddp      DDP on 2 ranks (worker.parallel_distiller, as a Ray worker builds it): rows
             equal the single-process loop's on the same global batches
    zero1-3  DeepSpeed ZeRO stage 1, 2, 3 (skipped, saying so, when DeepSpeed is not
             installed, as on the device machine unless bench/wheels comes along): same
    resume   DDP and ZeRO-3 restarted from their checkpoint at step 8: rows equal the
             uninterrupted runs'
    export   export.streamed of the trained rows, loaded back by transformers
    fit      the output fit (output_fit.fit_on_text) on a tiny Llama with a trained BPE
             tokenizer, its steps over a draw of the rows: held-back loss falls, fitted
             rows fp32, input rows untouched
    eval     shard 1 of 2 of the held-out evaluation (eval.heldout.score_part) with the
             fitted rows, and shards.merge of it: drift, bits per byte, generation
             (gpu_check_text.py; skipped without pyahocorasick)
    rows     30,000 new rows at Llama-3-8B width (hidden 4096, 128256 vocab, 2 layers):
             step time, peak memory and MFU
    measure  step time, snippets/s, peak memory and MFU on a Llama-3-8B-shaped model at
             batch 16 and 32 (gpu_check_measure.py gives the FLOP count and GPU peaks)

How ranks share the one GPU: gpu_check_runs.py. `--dry-run` runs every stage on the CPU
(gloo, tiny models for the measurements too, no MFU) in about two minutes: the tests run it.

    bash bench/gpu_check.sh [--dry-run] [--stages ddp,resume] [--fail-at STAGE] [--json PATH]

A summary table closes the run; the JSON goes to --json, or to $OUT/gpu_check.json when
OUT is set (the device machine's folder that comes back). Exit status 0: every stage that
ran passed; 1: a stage failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from gpu_check_measure import LLAMA3_8B, N_NEW, Measurement, build_model, measure, peak_tflops
from gpu_check_runs import (
    CHECKPOINT_STEP,
    FAIL_STEP,
    INITIAL_ROWS,
    TINY,
    CheckData,
    RankedRun,
    backend,
    export_round_trip,
    fail_if_injected,
    losses,
    read_precision,
    read_result,
    require_fp32,
    rows_gap,
    tiny_check_data,
    train_ranks,
    train_single_process,
)
from gpu_check_text import EVAL_SHARDS, TextModel, build_text_model, evaluation_shard, fit_output

from tokdist_ray.training.checkpoint import checkpoint_name
from tokdist_ray.training.step import bf16_supported
from tokdist_ray.vocab.weights import read_rows

# Rows of two runs may differ by this share of how far training moved them: fp32 round-off,
# or bf16 (kernels picked by batch shape, DeepSpeed's bf16 copy of the rows) when autocast is on.
GAP_TOLERANCE = {"fp32": 1e-4, "bf16": 0.1}
RESUME_TOLERANCE = {"fp32": 1e-6, "bf16": 1e-2}  # the same shapes in the same order
SKIPPED, PASSED, FAILED, NOT_RUN = "skipped", "passed", "failed", "not run"
WIDE_ROWS = 30_000  # the mission's new tokens
WIDE = {**LLAMA3_8B, "num_hidden_layers": 2}  # Llama-3-8B's width (embedding, LM head, layers) at little depth


@dataclass
class Check:
    """What the stages share: options, the tiny model's data, a work folder, earlier results."""

    args: argparse.Namespace
    data: CheckData
    work: Path
    peak: float | None  # the GPU's dense bf16 TFLOP/s, None where unknown
    ran: set[str] = field(default_factory=set)
    measurements: list[tuple[str, Measurement]] = field(default_factory=list)  # (the model's shape, one batch's)
    fitted_rows: dict | None = None  # the fit stage's rows, which eval scores
    _text: TextModel | None = None

    @property
    def precision(self) -> str:
        return "bf16" if self.data.training.mixed_precision and bf16_supported(self.data.device) else "fp32"

    def text(self) -> TextModel:
        """The tiny text model that fit and eval share, made on first use."""
        if self._text is None:
            self._text = build_text_model(self.work / "text")
        return self._text


@dataclass
class Stage:
    name: str
    needs: tuple[str, ...]
    run: Callable[[Check], tuple[str, dict]]  # -> (one-line detail, metrics for the JSON)
    skip: Callable[[Check], str | None] = lambda check: None  # a reason to skip, or None


def no_deepspeed(check: Check) -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return ("DeepSpeed is not installed (the device machine's image has none): ZeRO not checked; "
                "bash bench/gpu_check.sh --prepare here, then carry bench/wheels")
    return None


def no_aho_corasick(check: Check) -> str | None:
    if importlib.util.find_spec("ahocorasick") is None:
        return ("pyahocorasick is not installed (the evaluation mines held-out snippets with it): "
                "bash bench/gpu_check.sh --prepare here, then carry bench/wheels")
    return None


# ---------------------------------------------------------------------------- stages
def run_step(check: Check) -> tuple[str, dict]:
    info = train_single_process(check.data, check.work / "step")
    _, progress = read_result(check.work / "step")
    curve = progress.history.loss_curve
    if not all(torch.isfinite(torch.tensor(losses(progress)))):
        raise AssertionError(f"loss not finite: {losses(progress)}")
    first, last = (statistics.mean(p["loss"] for p in curve if p["epoch"] == e) for e in (0, curve[-1]["epoch"]))
    if not last < first:
        raise AssertionError(f"loss did not fall: first epoch {first:.5g}, last epoch {last:.5g}")
    if check.data.use_gpu and (info["model_dtype"] != "bfloat16" or not info["autocast_bf16"]):
        raise AssertionError(f"the GPU step is not bf16: {info}")
    require_fp32(info["precision"], "single process")
    detail = (f"loss {first:.4g} -> {last:.4g} (mean of first and last epoch, {len(curve)} steps); "
              f"model {info['model_dtype']}, rows, grads and moments fp32, "
              f"bf16 autocast {'on' if info['autocast_bf16'] else 'off'}")
    return detail, {**info, "loss_curve": losses(progress)}


def ranked_stage(strategy: str, zero_stage: int | None) -> Callable[[Check], tuple[str, dict]]:
    def run(check: Check) -> tuple[str, dict]:
        world = 2 if strategy == "ddp" else check.args.zero_ranks
        name = strategy if strategy == "ddp" else f"zero{zero_stage}"
        checkpoint_every = CHECKPOINT_STEP if name in ("ddp", "zero3") else 0  # resumed from by `resume`
        train_ranks(check.data, RankedRun(strategy, zero_stage, world, str(check.work / name), checkpoint_every))
        precision = read_precision(check.work / name)
        require_fp32(precision, name)
        detail, metrics = compare(check, check.work / name, check.work / "step", GAP_TOLERANCE,
                                  f"{world} rank{'s' if world > 1 else ''} over {backend(check.data.use_gpu, world)}",
                                  "the single-process loop's")
        return detail + "; rows, grads and moments fp32", {**metrics, "precision": precision}

    return run


def run_resume(check: Check) -> tuple[str, dict]:
    details, metrics = [], {}
    for name in ("ddp", "zero3"):
        if name not in check.ran:
            details.append(f"{name}: not checked, its stage did not run")
            continue
        world = 2 if name == "ddp" else check.args.zero_ranks
        strategy, stage = ("ddp", None) if name == "ddp" else ("deepspeed", 3)
        out = check.work / f"resume-{name}"
        train_ranks(check.data, RankedRun(strategy, stage, world, str(out),
                                          resume_from=str(check.work / name / checkpoint_name(CHECKPOINT_STEP))))
        _, progress = read_result(out)
        if progress.resumed_from != [CHECKPOINT_STEP]:
            raise AssertionError(f"{name}: resumed_from {progress.resumed_from}, expected [{CHECKPOINT_STEP}]")
        detail, metrics[name] = compare(check, out, check.work / name, RESUME_TOLERANCE, name, "uninterrupted")
        details.append(detail)
    return f"from step {CHECKPOINT_STEP}: " + "; ".join(details), metrics


def compare(check: Check, run: Path, reference: Path, tolerance: dict, label: str, against: str) -> tuple[str, dict]:
    rows, progress = read_result(run)
    reference_rows, _ = read_result(reference)
    gap = rows_gap(rows, reference_rows, read_rows(check.work / "step" / INITIAL_ROWS))
    limit = tolerance[check.precision]
    if not gap <= limit:
        raise AssertionError(f"{label}: rows are {gap:.3g} of training's move away from {against} (tolerance {limit})")
    detail = f"{label}: rows {gap:.1e} of training's move from {against} (tolerance {limit:g})"
    return detail, {"rows_gap": gap, "tolerance": limit, "loss_curve": losses(progress)}


def run_export(check: Check) -> tuple[str, dict]:
    rows, _ = read_result(check.work / "step")
    info = export_round_trip(check.data, rows, check.work / "export")
    return f"{info['vocab']} rows in and out, old rows unchanged, {info['bytes'] / 1e6:.1f} MB", info


def run_fit(check: Check) -> tuple[str, dict]:
    fail_if_injected(1, 0)  # the fit has no loop steps of ours: --fail-at fit fails it here
    check.fitted_rows, summary = fit_output(check.text(), check.data.device)
    detail = (f"held-back loss {summary['held_back_loss_start']:.4g} -> {summary['held_back_loss_best']:.4g} over "
              f"{summary['positions']} positions in {summary['steps']} steps of {summary['rows_per_step']} rows; fitted "
              "rows fp32, input rows untouched")
    return detail, summary


def run_eval(check: Check) -> tuple[str, dict]:
    fail_if_injected(1, 0)
    shard, report = evaluation_shard(check.text(), check.fitted_rows)
    drift, bits = report["methods"], report["bits_per_byte"]["methods"]
    detail = (f"shard 1 of {EVAL_SHARDS} on {shard['device']}: {shard['heldout_snippets']} held-out snippets, drift "
              f"(hidden MSE) {drift['token_distillation']['overall']['hidden_mse']:.4g} vs FVT "
              f"{drift['fvt']['overall']['hidden_mse']:.4g}, bits/byte {bits['token_distillation']['bits_per_byte']:.3f} vs "
              f"original {bits['original']['bits_per_byte']:.3f}, generation measured")
    return detail, {"heldout_snippets": shard["heldout_snippets"], "drift": drift,
                    "bits_per_byte": {name: b["bits_per_byte"] for name, b in bits.items()}}


def run_rows(check: Check) -> tuple[str, dict]:
    config = TINY if check.args.dry_run else WIDE
    return measured(check, config, "tiny" if check.args.dry_run else "Llama-3-8B width, 2 layers",
                    check.args.batches[:1], WIDE_ROWS)


def run_measure(check: Check) -> tuple[str, dict]:
    config = TINY if check.args.dry_run else LLAMA3_8B
    return measured(check, config, "tiny" if check.args.dry_run else "Llama-3-8B-shaped", check.args.batches)


def measured(check: Check, config: dict, shape: str, batches: list[int], n_new: int = N_NEW) -> tuple[str, dict]:
    """Steps timed on a random model of `config` (bf16 on the GPU), their state checked fp32."""
    model = build_model(config, check.data.device, torch.bfloat16 if check.data.use_gpu else torch.float32)
    results = measure(model, batches, check.args.steps, check.args.warmup, check.peak, n_new)
    for m in results:
        require_fp32(m.precision, f"{shape}, batch {m.batch}")
    check.measurements += [(shape, m) for m in results]
    parts = [f"batch {m.batch}: {m.seconds_per_step:.3f} s, {m.snippets_per_s:.1f} snippets/s, MFU {mfu_text(m)}"
             + (f", peak {m.peak_memory_gb:.1f} GB" if m.peak_memory_gb is not None else "") for m in results]
    return f"{shape}, {n_new} new rows: " + "; ".join(parts) + "; rows, grads and moments fp32", {
        "model": config, "peak_tflops": check.peak, "measurements": [m.as_dict() for m in results]}


def mfu_text(m: Measurement) -> str:
    return f"{m.mfu:.1%}" if m.mfu is not None else "unknown"


STAGES = [
    Stage("step", (), run_step),
    Stage("ddp", ("step",), ranked_stage("ddp", None)),
    *(Stage(f"zero{s}", ("step",), ranked_stage("deepspeed", s), no_deepspeed) for s in (1, 2, 3)),
    Stage("resume", ("ddp", "zero3"), run_resume),
    Stage("export", ("step",), run_export),
    Stage("fit", (), run_fit),
    Stage("eval", ("fit",), run_eval, no_aho_corasick),
    Stage("rows", (), run_rows),
    Stage("measure", (), run_measure),
]


# ---------------------------------------------------------------------------- the run
def selected(names: list[str] | None) -> list[Stage]:
    """The stages asked for and every stage they need, in the fixed order."""
    by_name = {s.name: s for s in STAGES}
    wanted = set(names or by_name)
    unknown = wanted - set(by_name)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; the stages are {', '.join(by_name)}")
    pending = list(wanted)
    while pending:
        for need in by_name[pending.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                pending.append(need)
    return [s for s in STAGES if s.name in wanted]


def run_stages(check: Check, stages: list[Stage]) -> list[dict]:
    results = []
    for i, stage in enumerate(stages):
        reason = stage.skip(check)
        if reason:
            results.append({"stage": stage.name, "status": SKIPPED, "seconds": 0.0, "detail": reason})
            print(f"== {stage.name}: skipped, {reason}", flush=True)
            continue
        print(f"== {stage.name}", flush=True)
        if check.args.fail_at == stage.name:
            os.environ[FAIL_STEP] = "1"  # read by the stage's loop, in this process or its ranks
        start = time.perf_counter()
        try:
            detail, metrics = stage.run(check)
        except Exception as error:  # a failed stage ends the run with its traceback and one line in the summary
            traceback.print_exc()
            lines = [line for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
            results.append({"stage": stage.name, "status": FAILED, "seconds": time.perf_counter() - start,
                            "detail": lines[-1].strip()})
            results += [{"stage": s.name, "status": NOT_RUN, "seconds": 0.0, "detail": f"after {stage.name} failed"}
                        for s in stages[i + 1:]]
            break
        finally:
            os.environ.pop(FAIL_STEP, None)
        check.ran.add(stage.name)
        results.append({"stage": stage.name, "status": PASSED, "seconds": time.perf_counter() - start,
                        "detail": detail, "metrics": metrics})
        print(f"   {detail}", flush=True)
    return results


def print_summary(results: list[dict], measurements: list[tuple[str, Measurement]], peak: float | None) -> None:
    print(f"\n{'stage':8} {'status':8} {'seconds':>8}  detail")
    for r in results:
        print(f"{r['stage']:8} {r['status']:8} {r['seconds']:8.1f}  {r['detail']}")
    if measurements:
        print(f"\nMFU against {f'{peak:g} TFLOP/s' if peak else 'an unknown peak'} (dense bf16)")
        print(f"{'model':26} {'new rows':>8} {'batch':>5} {'s/step':>8} {'snippets/s':>10} {'TFLOP/step':>10} "
              f"{'TFLOP/s':>8} {'MFU':>7} {'prefix skipped':>14} {'peak GB':>8}")
        for shape, m in measurements:
            memory = f"{m.peak_memory_gb:.1f}" if m.peak_memory_gb is not None else "-"
            print(f"{shape:26} {m.n_new:8d} {m.batch:5d} {m.seconds_per_step:8.3f} {m.snippets_per_s:10.1f} "
                  f"{m.tflop_per_step:10.2f} {m.tflops:8.1f} {mfu_text(m):>7} {m.prefix_skipped:14.1%} {memory:>8}")


def environment(check: Check) -> dict:
    import transformers

    device = check.data.device
    spec = importlib.util.find_spec("deepspeed")
    return {
        "mode": "dry-run" if check.args.dry_run else "gpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "deepspeed": importlib.metadata.version("deepspeed") if spec else None,
        "precision": check.precision,
        "peak_tflops": check.peak if check.peak else "unknown",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo and the tiny model everywhere")
    parser.add_argument("--stages", type=lambda s: s.split(","), help="comma list (default: all); adds what they need")
    parser.add_argument("--fail-at", metavar="STAGE", help="make that stage fail at its first step (tests the stop)")
    parser.add_argument("--json", type=Path, help="default: $OUT/gpu_check.json when OUT is set")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[16, 32])
    parser.add_argument("--steps", type=int, help="timed steps a batch size (default: 10, dry run 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (at least 1)")
    parser.add_argument("--zero-ranks", type=int, choices=(1, 2), default=1,
                        help="ZeRO ranks; 2 share the GPU over gloo (see gpu_check_runs.py)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense bf16 peak (known: H100, H200, A100, L40S; MFU is unknown elsewhere)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.dry_run else 10)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first timed step starts where a warm-up step ends")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: --dry-run runs the check on the CPU")
    if args.json is None and os.environ.get("OUT"):
        args.json = Path(os.environ["OUT"]) / "gpu_check.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.dry_run else "cuda")  # read when a rank imports DeepSpeed
    stages = selected(args.stages)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        data = tiny_check_data(Path(work), use_gpu=not args.dry_run)
        check = Check(args, data, Path(work), peak_tflops(data.device, args.peak_tflops))
        env = environment(check)
        print(" ".join(f"{k} {v}" for k, v in env.items()), flush=True)
        results = run_stages(check, stages)
    print_summary(results, check.measurements, check.peak)
    passed = all(r["status"] in (PASSED, SKIPPED) for r in results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**env, "passed": passed, "stages": results}, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
