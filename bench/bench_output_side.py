"""Output-side distillation: does the expanded model predict its new tokens as well as the
original predicted their pieces?

Runs the job on one config several times in one run_dir, changing only the training
losses and whether a tied model is exported untied: the tokens and snippets stages are
shared, each variant distills and is evaluated on the same held-out text. Prints one
table: tokens and bits per byte of the original, the baselines and each variant, the bits
split between new-token targets and the others, the hidden-state drift against FVT, and
the size of the exported model.

    python bench/bench_output_side.py --config jobs/configs/demo_cpu.yaml --from-corpus 100 [--section.key value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

from tokdist_ray.console import console_logging, quiet_console
from tokdist_ray.job.config import load_config, parse_overrides
from tokdist_ray.job.pipeline import run_job

OUTPUT_LOSS = ["MSE-on-hiddens", "KL-on-new-token-outputs"]
VARIANTS = {
    "MSE-on-hiddens (reference)": {"training.loss_methods": ["MSE-on-hiddens"]},
    "+ KL-on-new-token-outputs, tied": {"training.loss_methods": OUTPUT_LOSS},
    "+ KL-on-new-token-outputs, untied": {"training.loss_methods": OUTPUT_LOSS, "training.untie_word_embeddings": True},
}
BASELINES = ("original", "fvt", "adapti-vocab")


def model_megabytes(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6


def run_variant(config_path: str, overrides: dict) -> dict:
    config = load_config(config_path, overrides)
    report = run_job(config)
    evaluation = json.loads(Path(report["outputs"]["evaluate"]["eval_path"]).read_text())
    return {"eval": evaluation, "model_mb": model_megabytes(Path(report["outputs"]["export"]["model_dir"]))}


def row(name: str, bits: dict, original: dict, drift: float | None, size: str) -> str:
    change = (bits["bits_per_byte"] / original["bits_per_byte"] - 1) * 100
    new = bits.get("bits_per_byte_new")
    other = bits.get("bits_per_byte_other", bits["bits_per_byte"])
    return (f"| {name} | {bits['tokens_per_byte']:.4f} | {bits['bits_per_byte']:.4f} | {change:+.2f}% | "
            f"{'' if new is None else f'{new:.4f}'} | {other:.4f} | {'' if drift is None else f'{drift:.3f}'} | {size} |")


def table(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))["eval"]
    methods = first["bits_per_byte"]["methods"]
    lines = ["| model | tokens/byte | bits/byte | vs original | bits/byte on new-token targets | on the others "
             "| hidden drift / FVT | safetensors MB |", "|---|---|---|---|---|---|---|---|"]
    for name in BASELINES:
        drift = None if name == "original" else first["relative_to_fvt"][name]["hidden_mse"]
        lines.append(row(name, methods[name], methods["original"], drift, ""))
    for name, result in results.items():
        evaluation = result["eval"]
        td = evaluation["bits_per_byte"]["methods"]["token_distillation"]
        drift = evaluation["relative_to_fvt"]["token_distillation"]["hidden_mse"]
        lines.append(row(f"Token Distillation, {name}", td, methods["original"], drift, f"{result['model_mb']:.1f}"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="jobs/configs/demo_cpu.yaml")
    ap.add_argument("--from-corpus", type=int, default=100, help="tokens chosen by continued BPE")
    ap.add_argument("--run-dir", default="runs/bench-output-side")
    ap.add_argument("--weight", type=float, default=0.4, help="training.new_token_output_weight")
    args, rest = ap.parse_known_args()
    console_logging()
    quiet_console()
    common = parse_overrides(rest) | {"run_dir": args.run_dir, "tokens.from_corpus": args.from_corpus, "training.new_token_output_weight": args.weight}
    results = {name: run_variant(args.config, common | overrides) for name, overrides in VARIANTS.items()}
    flags = subprocess.run(["bash", "-c", "lscpu | grep -i '^flags'"], capture_output=True, text=True).stdout
    print(f"\n{args.config}, {args.from_corpus} tokens from the corpus, weight {args.weight}; "
          f"{platform.processor() or platform.machine()}; bf16 flags: "
          f"{' '.join(f for f in flags.split() if 'bf16' in f or 'amx' in f) or 'none'}\n")
    print(table(results))


if __name__ == "__main__":
    main()
