"""A whole vocabulary expansion, end to end, on this machine: jobs/configs/expand_2k_cpu.yaml
(2,000 merges of continued BPE on the Python docs, mined, distilled, exported, evaluated).

Runs the job, or continues it: killed part way, the same command reuses the finished
stages and resumes distillation from its last checkpoint. Then prints what a user sizing
such a run needs: seconds per stage, the peak memory of each process, tokens and snippets,
the positions that trained the new tokens, and the held-out compression, bits per byte and
drift against the baselines.

    python bench/bench_full_expansion.py [--config jobs/configs/expand_2k_cpu.yaml] [--section.key value ...]

`--build-corpus MB` first writes a corpus of that many MB of Debian's documentation as
parquet shards into the config's first data path, leaving out its held-out paths
(bench_mining.build_corpus; once, reused after): jobs/configs/expand_30k_cpu.yaml reads it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from bench_mining import build_corpus
from peak_memory import PeakMemory

from tokdist_ray.console import console_logging, quiet_console
from tokdist_ray.job.config import load_config, parse_overrides
from tokdist_ray.job.pipeline import run_job

METHODS = ("original", "token_distillation", "fvt", "adapti-vocab", "mean_embedding")


def stage_table(job: dict) -> str:
    lines = ["| stage | seconds | reused |", "|---|---|---|"]
    for stage, seconds in job["stage_seconds"].items():
        lines.append(f"| {stage} | {seconds:.0f} | {'yes' if stage in job['stages_reused'] else ''} |")
    return "\n".join(lines)


def token_lines(model_report: dict, training: dict) -> list[str]:
    added = model_report["tokens_added"]
    distilled = [t for t in added if t["snippets"]]
    positions = [t["positions_per_epoch"] for t in distilled]
    return [
        f"new tokens: {len(added)} ({len(added) - len(distilled)} without snippets keep their pre-initialised rows)",
        f"snippets trained: {training['snippets']}, steps {training['steps']}, {training['seconds']:.0f} s, "
        f"stopped by {training['stopped_by']}, {training['prefix_skipped']:.0%} of student positions from the teacher's prefix",
        f"positions per distilled token and epoch: median {statistics.median(positions):.0f}, "
        f"min {min(positions)}, max {max(positions)}",
    ]


def quality_table(evaluation: dict) -> str:
    bits = evaluation["bits_per_byte"]["methods"]
    drift = evaluation["relative_to_fvt"]
    lines = ["| model | tokens/byte | bits/byte | vs original | bits/byte on new-token targets | hidden drift / FVT |",
             "|---|---|---|---|---|---|"]
    for name in METHODS:
        b = bits[name]
        change = (b["bits_per_byte"] / bits["original"]["bits_per_byte"] - 1) * 100
        new = f"{b['bits_per_byte_new']:.4f}" if "bits_per_byte_new" in b else ""
        ratio = f"{drift[name]['hidden_mse']:.3f}" if name in drift else ""
        lines.append(f"| {name} | {b['tokens_per_byte']:.4f} | {b['bits_per_byte']:.4f} | {change:+.2f}% | {new} | {ratio} |")
    return "\n".join(lines)


def stage_at(moment: float, stages_dir: Path) -> str:
    """The stage that was running at `moment` (a stage's record is written when it ends)."""
    for record in stages_dir.glob("*.json"):
        end = record.stat().st_mtime
        if end - json.loads(record.read_text())["seconds"] <= moment <= end + 1:
            return record.stem
    return "between stages"


def memory_table(memory: PeakMemory, stages_dir: Path) -> str:
    lines = ["| process | how many | peak RSS MB (largest) | stage at that peak |", "|---|---|---|---|"]
    for title, peaks in memory.by_title().items():
        if peaks[0].rss >= 50e6:  # idle pool workers and Ray's small helpers left out
            lines.append(f"| {title} | {len(peaks)} | {peaks[0].rss / 1e6:,.0f} | {stage_at(peaks[0].at, stages_dir)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="jobs/configs/expand_2k_cpu.yaml")
    ap.add_argument("--build-corpus", type=float, metavar="MB",
                    help="first build a corpus of this many MB into the config's first data path")
    args, rest = ap.parse_known_args()
    console_logging()
    quiet_console()
    config = load_config(args.config, parse_overrides(rest))
    if args.build_corpus:
        t = time.perf_counter()
        shards = build_corpus(Path(config.data.paths[0]), args.build_corpus, tuple(config.eval.heldout_paths))
        print(f"corpus: {len(shards)} shards in {config.data.paths[0]} ({time.perf_counter() - t:.0f} s)", flush=True)
    with PeakMemory() as memory:
        job = run_job(config)
    model_report = json.loads(Path(job["outputs"]["export"]["report_path"]).read_text())
    evaluation = json.loads(Path(job["outputs"]["evaluate"]["eval_path"]).read_text())
    flags = subprocess.run(["bash", "-c", "lscpu | grep -i '^flags'"], capture_output=True, text=True).stdout
    print(f"\n{args.config}: {job['wall_seconds']:.0f} s this call; avx512_bf16: {'avx512_bf16' in flags}, "
          f"amx: {'amx' in flags}, avx2: {'avx2' in flags}\n")
    print(stage_table(job), "", memory_table(memory, Path(config.run_dir) / "stages"), "",
          *token_lines(model_report, model_report["training"]), "", quality_table(evaluation), sep="\n")


if __name__ == "__main__":
    main()
