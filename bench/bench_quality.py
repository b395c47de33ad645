"""Quality per compute on the demo workload: held-out drift of Token Distillation relative
to FVT (subtoken mean), after one epoch and within a wall-time budget that picks the
number of passes.

    python bench/bench_quality.py --tokens 16 --snippets 100 --snippet-len 50 --batch-size 16 --budget-s 330

Trains on the Python docs' training split and evaluates on the held-out split (every
10th file), both from Debian's python3.11-doc. Prints one table; lower is better.

The tokenizer is expanded with merges (`expand_with_merges`, as `TokenDistillation.run`
does by default): every method gets a row per new id, the words plus the intermediate
merge tokens they need, so there may be more rows than words. Held-out drift is measured
on the words' snippets (in the expanded tokenizer's ids), as before the change.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tokdist_ray import DistillationConfig, FileDataSource, TokenDistillation
from tokdist_ray.data.mining.local_mining import mine_snippets
from tokdist_ray.eval.drift import baseline_rows, drift, relative_to
from tokdist_ray.training.batching import align_snippets
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import resolve_model_path
from tokdist_ray.vocab.selection import frequent_fragmented_words

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DOCS_SOURCES, split_corpus  # noqa: E402  (one definition of the split)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--snippets", type=int, default=100)
    ap.add_argument("--snippet-len", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=3e-3)
    ap.add_argument("--budget-s", type=float, default=330.0, help="end-to-end wall-time budget (load, mine, train) for the budgeted run")
    args = ap.parse_args()

    path = resolve_model_path("bundled:smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    split = split_corpus(DOCS_SOURCES)
    train = [p.read_text(encoding="utf-8") for p in split.train]
    heldout = [p.read_text(encoding="utf-8") for p in split.heldout]
    joined = "\n".join(heldout)
    # 2+ pieces: at 3+ the training split has too few words with 100 distinct contexts
    ranked = frequent_fragmented_words(tokenizer, train, 400, min_pieces=2, min_count=int(1.5 * args.snippets))
    words = [w for w, _ in ranked if joined.count(w) >= 5][: args.tokens]
    expansion = expand_with_merges(tokenizer, words)  # the one TokenDistillation.run builds
    tokens, new_start = expansion.tokens, expansion.new_start
    requested = {t.text for t in expansion.requested}

    def run(cfg: DistillationConfig):
        start = time.perf_counter()
        td = TokenDistillation(path, device="cpu")
        model, _ = td.run(words, data=FileDataSource([str(p) for p in split.train]), snippet_len=args.snippet_len,
                          snippets_per_token=args.snippets, training=cfg)
        rows = model.get_input_embeddings().weight[new_start:].detach().clone()
        assert len(rows) == len(tokens), f"{len(rows)} rows trained, the expansion has {len(tokens)} new ids"
        return rows, time.perf_counter() - start, td.last_report

    rows, timings = {}, {}
    one_epoch = DistillationConfig(epochs=1, batch_size=args.batch_size, learning_rate=args.learning_rate, log_every=20)
    rows["1 epoch"], wall, report = run(one_epoch)
    timings["1 epoch"] = (wall, report["training"])
    # the budget is end to end: training gets what loading and mining left of it
    overhead = wall - report["training"]["seconds"]
    budget = dataclasses.replace(one_epoch, epochs=100, time_budget_s=args.budget_s - overhead)
    name = f"budget {args.budget_s:.0f}s"
    rows[name], wall, report = run(budget)
    timings[name] = (wall, report["training"])

    td = TokenDistillation(path, device="cpu")
    mined, _ = mine_snippets(heldout, expansion, args.snippet_len, 20)
    snippets = [s for s in mined if s["token"] in requested]  # the words' snippets, not the intermediates'
    examples = align_snippets(PieceAligner.for_tokens(tokens, new_start), [s["input_ids"] for s in snippets])
    methods = {**baseline_rows(td.model, tokens, new_start), **{f"tokdist {k}": v for k, v in rows.items()}}
    with torch.inference_mode():
        results = drift(td.model, new_start, methods, examples, [s["token"] for s in snippets])
    ratios = relative_to(results)

    print(f"SmolLM2-135M, {expansion.n_requested} words x {args.snippets} snippets of {args.snippet_len}, "
          f"batch {args.batch_size}, lr {args.learning_rate}; held-out: {len(examples)} snippets of the words from "
          f"{len(split.heldout)} files ({len(mined) - len(snippets)} of intermediate tokens left out)")
    print(f"new rows per method: {len(tokens)} = {expansion.n_requested} words + {len(expansion.intermediates)} "
          f"intermediate merge tokens ({len(words)} words asked, {len(expansion.skipped)} skipped by the merges)")
    n_train = sum(t["snippets"] for t in report["tokens_added"])
    print("| method | wall s (end to end) | steps | epochs | hidden MSE / FVT | KL / FVT |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in methods:
        wall, history = timings.get(name.removeprefix("tokdist "), (None, None))
        run_cols = f"{wall:.0f} | {history['steps']} | {history['snippets'] / n_train:.2f}" if wall else "- | - | -"
        print(f"| {name} | {run_cols} | {ratios[name]['hidden_mse']:.3f} | {ratios[name]['kl']:.3f} |")


if __name__ == "__main__":
    main()
