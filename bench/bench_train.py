"""Distributed distillation on SmolLM2-135M: throughput by strategy and worker count, and
the memory held for training state per worker.

1. snippets/s of `distill_distributed` with 1 and 2 Ray Train workers (1 CPU each),
   DDP and DeepSpeed ZeRO-3, one after the other in one run on the same snippets
   (mined from the Python docs with the tokenizer expanded by merges, in its ids). Seconds
   are the training loop's (report.json), so worker start-up is left out; the wall time
   of each run is shown next to it. Rows are trained for every new id: the words plus the
   intermediate merge tokens they need (printed with the snippet count).
2. Training state for 10,000 new tokens: measured on SmolLM2 as the bytes of the tensors
   that exist only for training after one optimizer step, for tokdist-ray's step (fp32
   new rows + gradient + 2 AdamW moments) and for full-matrix training as the reference
   does it (fp32 gradient + 2 AdamW moments over the whole vocab x hidden table);
   computed with the same formulas for a Llama-3-8B shape, per worker under DDP and
   ZeRO-3 (which shards all of it over the workers).

    python bench/bench_train.py --steps 8 --batch-size 4
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

from tokdist_ray.config import DistillationConfig, DistributedConfig
from tokdist_ray.data.mining.local_mining import mine_snippets
from tokdist_ray.data.snippets import snippets_to_table
from tokdist_ray.training.ray_trainer import distill_distributed
from tokdist_ray.training.schedule import make_optimizer
from tokdist_ray.training.step import NewRows, TokenDistiller
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model, resolve_model_path
from tokdist_ray.vocab.selection import frequent_fragmented_words

DOCS = "/usr/share/doc/python3.11/html/_sources/**/*.txt"
REPO = Path(__file__).resolve().parents[1]
RUNS = [("ddp", 1), ("ddp", 2), ("deepspeed", 1), ("deepspeed", 2)]
N_NEW = 10_000
LLAMA3_8B = {"vocab": 128_256, "hidden": 4_096}


# ---------------------------------------------------------------------------- throughput
def write_snippets(model_dir: str, out: Path, n_tokens: int, per_token: int, snippet_len: int):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [open(f, encoding="utf-8").read() for f in sorted(glob.glob(DOCS, recursive=True))]
    words = [w for w, _ in frequent_fragmented_words(tokenizer, texts, n_tokens)]
    expansion = expand_with_merges(tokenizer, words)
    rows, _ = mine_snippets(texts, expansion, snippet_len, per_token)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(snippets_to_table(rows), out / "snippets.parquet")
    aligner = PieceAligner.for_tokens(expansion.tokens, expansion.new_start)
    teacher_len = sum(len(aligner.align(r["input_ids"]).teacher_ids) for r in rows) / len(rows)
    return expansion, len(rows), sum(len(r["input_ids"]) for r in rows) / len(rows), teacher_len


def throughput(model_dir: str, args, work: Path) -> list[dict]:
    import ray

    expansion, n_snippets, mean_len, teacher_len = write_snippets(
        model_dir, work / "snippets", args.tokens, args.per_token, args.snippet_len)
    print(f"{len(expansion.tokens)} new rows ({expansion.n_requested} words + {len(expansion.intermediates)} "
          f"intermediate merge tokens), {n_snippets} snippets of {mean_len:.0f} expanded ids on average "
          f"({teacher_len:.0f} original ids for the teacher); tokens/s counts the expanded ids")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    training = DistillationConfig(batch_size=args.batch_size, max_steps=args.steps, log_every=args.steps)
    results = []
    try:
        for strategy, workers in RUNS:
            name = f"{strategy}-{workers}"
            dist = DistributedConfig(
                num_workers=workers, strategy=strategy, zero_stage=3 if strategy == "deepspeed" else None,
                checkpoint_every=0, storage_path=str(work / "checkpoints"), run_name=name,
            )
            start = time.perf_counter()
            result = distill_distributed(model_dir, str(work / "snippets"), expansion, work / name, training, dist)
            wall = time.perf_counter() - start
            history = result.report["training"]
            rate = history["snippets"] / history["seconds"]
            results.append({"run": name, "workers": workers, "global_batch": args.batch_size * workers,
                            "snippets_per_s": rate, "tokens_per_s": rate * mean_len, "wall_s": wall})
            print(f"{name}: {rate:.2f} snippets/s, wall {wall:.0f}s", flush=True)
    finally:
        ray.shutdown()
    return results


# ---------------------------------------------------------------------------- memory
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0)


def held_state(optimizer, count_params: bool) -> int:
    """Bytes of gradients, optimizer moments and (for the new rows) the trained rows."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    moments = [v for state in optimizer.state.values() for v in state.values()]
    return tensor_bytes(([p.detach() for p in params] if count_params else []) + [p.grad for p in params if p.grad is not None] + moments)


def sample_batch(vocab: int, new_start: int, n_new: int) -> dict:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randint(0, vocab, (2, 32), generator=g)
    student = teacher.clone()
    student[:, 5::7] = torch.randint(new_start, new_start + n_new, student[:, 5::7].shape, generator=g)
    return {"teacher_ids": teacher, "student_ids": student, "teacher_index": torch.arange(32).expand(2, -1),
            "student_mask": torch.ones(2, 32, dtype=torch.bool)}


def measured_new_rows_state(model_dir: str) -> int:
    model = load_model(model_dir)
    emb = model.get_input_embeddings().weight
    vocab, d = emb.shape
    distiller = TokenDistiller(model, NewRows(emb[:N_NEW].detach().clone()), vocab, mixed_precision=False)
    optimizer, _ = make_optimizer([distiller.rows.input], DistillationConfig(), 1)
    distiller(sample_batch(vocab, vocab, N_NEW))["loss"].backward()
    optimizer.step()
    return held_state(optimizer, count_params=True)


def measured_full_matrix_state(model_dir: str) -> int:
    """The reference's way: resize, train the whole (tied) table, zero old rows' grads."""
    model = load_model(model_dir)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + N_NEW, mean_resizing=False)
    table = model.get_input_embeddings().weight
    table.requires_grad_(True)
    optimizer = torch.optim.AdamW([table], lr=1e-4, weight_decay=0.0)
    batch = sample_batch(vocab, vocab, N_NEW)
    model(input_ids=batch["student_ids"]).logits.float().square().mean().backward()
    table.grad[:vocab] = 0
    optimizer.step()
    return held_state(optimizer, count_params=False)


def new_rows_formula(n_new: int, d: int) -> int:
    return 4 * n_new * d * 4  # fp32 rows, gradient, exp_avg, exp_avg_sq


def full_matrix_formula(vocab: int, n_new: int, d: int) -> int:
    return 3 * (vocab + n_new) * d * 4  # fp32 gradient, exp_avg, exp_avg_sq


def memory_rows(model_dir: str) -> list[tuple]:
    config = load_model(model_dir).config
    vocab, d = config.vocab_size, config.hidden_size
    ours, full = measured_new_rows_state(model_dir), measured_full_matrix_state(model_dir)
    rows = [("SmolLM2-135M, measured, 1 worker", ours, full),
            ("SmolLM2-135M, formula, 1 worker", new_rows_formula(N_NEW, d), full_matrix_formula(vocab, N_NEW, d))]
    v, h = LLAMA3_8B["vocab"], LLAMA3_8B["hidden"]
    for label, workers in (("DDP, per worker", 1), ("ZeRO-3 on 2 workers, per worker", 2), ("ZeRO-3 on 8 workers, per worker", 8)):
        rows.append((f"Llama-3-8B shape, {label}", new_rows_formula(N_NEW, h) // workers, full_matrix_formula(v, N_NEW, h) // workers))
    return rows


# ---------------------------------------------------------------------------- report
def print_tables(runs: list[dict], memory: list[tuple]) -> None:
    base = runs[0]["snippets_per_s"]
    print("\nThroughput on SmolLM2-135M (CPU workers, 1 CPU each, bf16 autocast where supported)")
    print(f"{'run':<14}{'workers':>8}{'global batch':>14}{'snippets/s':>12}{'tokens/s':>10}{'vs ddp-1':>10}{'wall s':>8}")
    for r in runs:
        print(f"{r['run']:<14}{r['workers']:>8}{r['global_batch']:>14}{r['snippets_per_s']:>12.2f}"
              f"{r['tokens_per_s']:>10.0f}{r['snippets_per_s'] / base:>10.2f}{r['wall_s']:>8.0f}")
    print(f"\nTraining state for {N_NEW:,} new tokens (MB = 2^20 bytes)")
    print(f"{'':<48}{'new rows':>10}{'full matrix':>13}{'full / new rows':>17}")
    for label, ours, full in memory:
        print(f"{label:<48}{ours / 2**20:>10.1f}{full / 2**20:>13.1f}{full / ours:>17.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="per worker")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--per-token", type=int, default=8)
    parser.add_argument("--snippet-len", type=int, default=50)
    args = parser.parse_args()
    model_dir = resolve_model_path("bundled:smollm2")
    memory = memory_rows(model_dir)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as work:
        runs = throughput(model_dir, args, Path(work))
    print_tables(runs, memory)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
