"""Grouped against random batches when snippets hold many new tokens (issue 15).

SmolLM2-135M with N new tokens (default 2,000) chosen by continued BPE on the Python
docs' training split (every file but every tenth), so most snippets hold several new
tokens. Prefix reuse runs the student only from the batch's first new token on; grouping
(`batch_grouping="first_new_token"`) puts snippets whose first new token sits at similar
positions into one batch.

1. Positions skipped over one epoch of every mined snippet, per batch size, grouped and
   random: the schedule alone, no model.
2. Training side by side: two sets of new rows on one frozen model, one on grouped and
   one on random batches of the same training snippets, taking turns step by step so
   machine noise hits both alike (same lr, same snippets each epoch): s/step, snippets/s,
   positions skipped, the epoch-mean training loss, and the last-layer MSE-on-hiddens on
   snippets mined from the held-out split (every tenth file), before training and after
   each half epoch.

    python bench/bench_grouping.py                                   # about 10 min on 2 cores
    python bench/bench_grouping.py --train-snippets 64 --epochs 1    # a quick look
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_selection import cpu_flags, split_docs  # noqa: E402
from tokdist_ray.config import DistillationConfig  # noqa: E402
from tokdist_ray.data.mining.local_mining import mine_snippets  # noqa: E402
from tokdist_ray.training.batching import align_snippets, collate  # noqa: E402
from tokdist_ray.training.rows import pre_init_rows  # noqa: E402
from tokdist_ray.training.schedule import SnippetSchedule, first_new_positions, make_optimizer  # noqa: E402
from tokdist_ray.training.step import NewRows, TokenDistiller, bf16_supported  # noqa: E402
from tokdist_ray.vocab.alignment import PieceAligner  # noqa: E402
from tokdist_ray.vocab.bpe_training import continue_bpe, pre_token_counts  # noqa: E402
from tokdist_ray.vocab.merges import expand_with_merges  # noqa: E402
from tokdist_ray.vocab.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402

GROUPINGS = ("first_new_token", "random")


def new_token_expansion(tokenizer, train: list[str], n: int):
    counts = pre_token_counts(tokenizer, train)
    return expand_with_merges(tokenizer, [t.text for t in continue_bpe(tokenizer, counts, n, min_count=2)])


def density(snippets: list[list[int]], new_start: int) -> str:
    new = [sum(t >= new_start for t in ids) for ids in snippets]
    first = first_new_positions(snippets, new_start)
    return (f"{len(snippets)} snippets of {statistics.mean(map(len, snippets)):.1f} ids: "
            f"{statistics.mean(new):.1f} new ids each, {sum(n >= 2 for n in new) / len(new):.0%} with 2+, "
            f"first new id at position {statistics.mean(first):.1f} on average")


def epoch_skipped(schedule: SnippetSchedule, snippets: list[list[int]], new_start: int) -> float:
    """The share of student positions one epoch's prefix reuse skips (step.shared_prefix
    per batch: the batch's first new token, leaving at least its last position to run)."""
    first = first_new_positions(snippets, new_start)
    skipped = total = 0
    for batch in schedule.epoch_batches(0):
        lengths = [len(snippets[i]) for i in batch]
        split = min(min(first[i] for i in batch), max(lengths) - 1)
        skipped += sum(min(split, n) for n in lengths)
        total += sum(lengths)
    return skipped / total


def schedule_table(snippets: list[list[int]], new_start: int, batch_sizes: list[int]) -> None:
    print("\n| batch size | positions skipped, random | grouped | student positions run, grouped / random |")
    print("|---:|---:|---:|---:|")
    for size in batch_sizes:
        shares = {g: epoch_skipped(SnippetSchedule.for_run(snippets, new_start, DistillationConfig(
            batch_size=size, batch_grouping=g)), snippets, new_start) for g in GROUPINGS}
        print(f"| {size} | {shares['random']:.1%} | {shares['first_new_token']:.1%} | "
              f"{(1 - shares['first_new_token']) / (1 - shares['random']):.2f} |")


class Arm:
    """New rows trained on one grouping: the local loop's pieces, one step at a time."""

    def __init__(self, model, expansion, examples: list[dict], cfg: DistillationConfig):
        phrases = [t.phrase_ids for t in expansion.tokens]
        rows = NewRows(pre_init_rows(model.get_input_embeddings().weight, phrases))
        self.distiller = TokenDistiller.from_config(model, rows, expansion.new_start, cfg)
        self.examples = examples
        self.schedule = SnippetSchedule.for_run([e["student_ids"] for e in examples], expansion.new_start, cfg)
        self.optimizer, self.lr_schedule = make_optimizer(list(rows.parameters()), cfg, self.schedule.total_steps(cfg))
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.skipped: list[float] = []

    def step(self, step: int) -> None:
        batch = collate([self.examples[i] for i in self.schedule.global_indices(step)])
        start = time.perf_counter()
        metrics = self.distiller(batch)
        metrics["loss"].backward()
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(metrics["loss"].item())
        self.skipped.append(float(metrics["prefix_skipped"]))

    @torch.no_grad()
    def heldout_mse(self, batches: list[dict]) -> float:
        """MSE-on-hiddens over every held-out position (batches weighted by positions)."""
        weighted = sum(float(self.distiller(b)["MSE-on-hiddens"]) * int(b["student_mask"].sum()) for b in batches)
        return weighted / sum(int(b["student_mask"].sum()) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--snippet-len", type=int, default=32)
    ap.add_argument("--per-token", type=int, default=4, help="snippets mined per token (training split)")
    ap.add_argument("--train-snippets", type=int, default=480, help="random sample of them trained on")
    ap.add_argument("--heldout-snippets", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a crowded machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    tokenizer = load_tokenizer("bundled:smollm2")
    train, heldout = split_docs()
    expansion = new_token_expansion(tokenizer, train, args.tokens)
    new_start = expansion.new_start
    rows, _ = mine_snippets(train, expansion, args.snippet_len, args.per_token)
    mined = [r["input_ids"] for r in rows]
    heldout_rows, _ = mine_snippets(heldout, expansion, args.snippet_len, 1)
    sample = random.Random(0)
    train_ids = sample.sample(mined, min(args.train_snippets, len(mined)))
    heldout_ids = sample.sample([r["input_ids"] for r in heldout_rows], min(args.heldout_snippets, len(heldout_rows)))
    print(f"SmolLM2-135M, {len(expansion.tokens)} new tokens by continued BPE; CPU flags: {cpu_flags()}; torch threads "
          f"{torch.get_num_threads()}; bf16 autocast {'on' if bf16_supported(torch.device('cpu')) else 'off'}; "
          f"setup {time.perf_counter() - started:.0f} s")
    print(f"mined (training split): {density(mined, new_start)}")
    print(f"trained on: {density(train_ids, new_start)}")
    print(f"held out: {density(heldout_ids, new_start)}")
    schedule_table(mined, new_start, [8, 16, 32, 64])

    aligner = PieceAligner.for_tokens(expansion.tokens, new_start)
    examples = align_snippets(aligner, train_ids)
    heldout_examples = align_snippets(aligner, heldout_ids)
    heldout_batches = [collate(heldout_examples[i : i + 16]) for i in range(0, len(heldout_examples), 16)]
    model = load_model(resolve_model_path("bundled:smollm2"), dtype=torch.float32)
    # the loss the figures in bench/README.md were measured with
    arms = {g: Arm(model, expansion, examples, DistillationConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, batch_grouping=g,
        loss_methods=["MSE-on-hiddens"])) for g in GROUPINGS}
    steps_per_epoch = arms["random"].schedule.batches_per_epoch
    total = arms["random"].schedule.total_steps(DistillationConfig(epochs=args.epochs, batch_size=args.batch_size))
    evals = {g: [(0, arm.heldout_mse(heldout_batches))] for g, arm in arms.items()}
    for step in range(total):
        for grouping, arm in arms.items():
            arm.step(step)
            if (step + 1) % max(1, steps_per_epoch // 2) == 0 or step + 1 == total:
                evals[grouping].append((step + 1, arm.heldout_mse(heldout_batches)))
                print(f"held-out MSE after step {step + 1}, {grouping}: {evals[grouping][-1][1]:.4f}", flush=True)
        print(f"step {step + 1}/{total}: " + ", ".join(
            f"{g} {a.seconds[-1]:.2f} s loss {a.losses[-1]:.4f} skipped {a.skipped[-1]:.0%}" for g, a in arms.items()),
            flush=True)
    report(arms, evals, steps_per_epoch, args.batch_size)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


def report(arms: dict[str, Arm], evals: dict[str, list], steps_per_epoch: int, batch_size: int) -> None:
    print("\n| batches | s/step (median) | snippets/s | positions skipped | training loss by epoch | held-out MSE |")
    print("|---|---:|---:|---:|---|---|")
    for grouping, arm in arms.items():
        seconds = statistics.median(arm.seconds[1:] or arm.seconds)  # the first step warms up
        epochs = [statistics.mean(arm.losses[i : i + steps_per_epoch]) for i in range(0, len(arm.losses), steps_per_epoch)]
        print(f"| {grouping} | {seconds:.3f} | {batch_size / seconds:.2f} | {statistics.mean(arm.skipped):.1%} | "
              f"{' / '.join(f'{x:.4f}' for x in epochs)} | {evals[grouping][-1][1]:.4f} |")
    print("held-out MSE after step: " + "; ".join(
        f"{g}: " + ", ".join(f"{step}: {mse:.4f}" for step, mse in points) for g, points in evals.items()))
    speed = statistics.median(arms["random"].seconds[1:]) / statistics.median(arms["first_new_token"].seconds[1:])
    print(f"grouped step speed-up: {speed:.2f}x; total time {sum(arms['random'].seconds):.0f} s random, "
          f"{sum(arms['first_new_token'].seconds):.0f} s grouped")


if __name__ == "__main__":
    main()
