"""A language the model fragments: what each training lever buys in bits per byte, at the
same tokens, snippets and held-out text.

Runs the job's tokens, snippets and distill stages once per variant in one run_dir (the
tokens are shared, and the snippets unless a variant changes their budget; each variant
distills and exports to its own folder),
then scores every variant's rows, FVT's and AdaptiVocab's on the same held-out chunks in
one pass, the original scored once. Prints one table: tokens and bits per byte, the
change over the original, the extra bits each spends on its new tokens against the
original's bits on the same spans (issue 23's target: at most +10%), and distill seconds.

    python bench/bench_language_shift.py --config jobs/configs/french_docs_cpu.yaml \\
        --variants default reference untied [--section.key value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tokdist_ray.config import FileDataSource
from tokdist_ray.console import console_logging, quiet_console
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.eval.bits_per_byte import heldout_chunks, score_methods
from tokdist_ray.eval.drift import baseline_rows
from tokdist_ray.job.config import load_config, parse_overrides
from tokdist_ray.job.pipeline import run_job
from tokdist_ray.stages import fit_text
from tokdist_ray.training.output_fit import fit_on_text
from tokdist_ray.training.snippet_files import read_snippets
from tokdist_ray.vocab.expansion_files import load_expansion
from tokdist_ray.vocab.models import load_model, load_tokenizer

# Each lever alone, against the config's settings ("default").
VARIANTS = {
    "default": {},
    "no output fit": {"output_fit.enabled": False},
    "output fit on 100 kB": {"output_fit.text_bytes": 100_000},
    "output fit on 1 MB": {"output_fit.text_bytes": 1_000_000},
    # the reference's loss alone, and its rows as the reference leaves them (no output fit)
    "reference": {"training.loss_methods": ["MSE-on-hiddens"], "output_fit.enabled": False},
    "reference loss, output fit": {"training.loss_methods": ["MSE-on-hiddens"]},
    "output weight 1": {"training.new_token_output_weight": 1.0},
    "output weight 2": {"training.new_token_output_weight": 2.0},
    "untied": {"training.untie_word_embeddings": True},
    "all positions": {"training.new_token_output_positions": "all"},
    "untied, first-piece output rows": {"training.untie_word_embeddings": True, "output.emb_policy": "first_piece"},
    "lr 1e-2": {"training.learning_rate": 1.0e-2},
    "2 epochs": {"training.epochs": 2},
    "24 snippets per token": {"snippets.snippets_per_token": 24},
    "budget by frequency": {"snippets.budget": "by_frequency"},
    "untied, first-piece output rows, budget by frequency": {
        "training.untie_word_embeddings": True, "output.emb_policy": "first_piece", "snippets.budget": "by_frequency"},
}
BASELINES = ("fvt",)  # AdaptiVocab and the others: the job's evaluate stage
FITTED_BASELINE = "fvt, output fit"  # FVT's input rows with output rows fitted as the job fits them
STAGES = ("tokens", "snippets", "distill", "fit")


def distill(config_path: str, common: dict, name: str, overrides: dict, run_dir: str) -> dict:
    folder = name.replace(" ", "_")
    config = load_config(config_path, common | overrides | {"run_dir": run_dir, "out_path": f"{run_dir}/models/{folder}"})
    start = time.perf_counter()
    report = run_job(config, STAGES)
    rows = load_file(report["outputs"]["fit"]["rows_path"])
    return {"rows": (rows["input"], rows.get("output")), "seconds": time.perf_counter() - start,
            "tokenizer": report["outputs"]["tokens"]["tokenizer_path"], "config": config,
            "snippets_report": report["outputs"]["snippets"]["report"]}


def fitted_baseline(model, expansion, input_rows, config, snippets_report) -> tuple:
    """A baseline's input rows with output rows fitted on the job's fit text, as the job fits them."""
    texts = fit_text(config.data.corpus, config.output_fit, snippets_report, expansion)
    snippets = read_snippets(str(Path(config.run_dir) / "snippets"), [t.text for t in expansion.tokens])
    rows, _ = fit_on_text(model, {"input": input_rows}, expansion.new_start, expansion.tokenizer, texts, config.output_fit,
                          config.training.seed, config.training.mixed_precision,
                          windows=snippets.corpus_windows(config.output_fit.snippets_per_token))
    return rows["input"], rows["output"]


def row(name: str, bits: dict, original: dict, seconds: float | None) -> str:
    change = (bits["bits_per_byte"] / original["bits_per_byte"] - 1) * 100
    spans = bits.get("new_token_spans")
    extra = "" if spans is None else f"{100 * spans['extra_share']:+.1f}%"
    return (f"| {name} | {bits['tokens_per_byte']:.4f} | {bits['bits_per_byte']:.4f} | {change:+.2f}% | {extra} | "
            f"{bits.get('bits_per_byte_new', 0):.4f} | {bits.get('bits_per_byte_other', bits['bits_per_byte']):.4f} | "
            f"{'' if seconds is None else f'{seconds:.0f}'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="jobs/configs/french_docs_cpu.yaml")
    ap.add_argument("--run-dir", default="runs/bench-language-shift")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", help="also write the scores here")
    ap.add_argument("--fitted-fvt", action="store_true", help="also FVT's input rows with fitted output rows")
    args, rest = ap.parse_known_args()
    console_logging()
    quiet_console()
    common = parse_overrides(rest)
    runs = {name: distill(args.config, common, name, VARIANTS[name], args.run_dir) for name in args.variants}
    first = next(iter(runs.values()))
    config, expansion = first["config"], load_expansion(first["tokenizer"])

    model = load_model(config.model, dtype=torch.float32)
    texts = [t for t in documents(FileDataSource(paths=list(config.eval.heldout_paths))) if isinstance(t, str)]
    chunks = heldout_chunks(texts, config.eval.chunk_bytes, config.eval.bits_per_byte_bytes)
    inputs, outputs = (baseline_rows(model, expansion.tokens, expansion.new_start, side) for side in ("input", "output"))
    methods = {name: run["rows"] for name, run in runs.items()} | {b: (inputs[b], outputs.get(b)) for b in BASELINES}
    if args.fitted_fvt:
        methods[FITTED_BASELINE] = fitted_baseline(model, expansion, inputs["fvt"], config, first["snippets_report"])
    scored = score_methods(model, load_tokenizer(config.model), expansion.tokenizer, expansion.new_start, methods,
                           chunks, config.eval.batch_size)["methods"]

    flags = subprocess.run(["bash", "-c", "lscpu | grep -i '^flags'"], capture_output=True, text=True).stdout
    print(f"\n{args.config} {' '.join(rest)}: {len(expansion.tokens)} new tokens, {len(chunks)} held-out chunks "
          f"({sum(len(c.encode()) for c in chunks)} bytes); {platform.processor() or platform.machine()}, "
          f"avx512_bf16/amx: {' '.join(f for f in flags.split() if 'bf16' in f or 'amx' in f) or 'none'}\n")
    print("| variant | tokens/byte | bits/byte | vs original | extra bits on new tokens vs original's on their spans "
          "| bits/byte on new tokens | on the others | distill s |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    print(row("original", scored["original"], scored["original"], None))
    for name in BASELINES + ((FITTED_BASELINE,) if args.fitted_fvt else ()):
        print(row(name, scored[name], scored["original"], None))
    for name, run in runs.items():
        print(row(f"Token Distillation, {name}", scored[name], scored["original"], run["seconds"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"scores": scored, "seconds": {n: r["seconds"] for n, r in runs.items()}},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
