"""Distillation step throughput on SmolLM2-135M: tokdist-ray's step vs the reference's.

The reference step (re-implemented here for measurement) trains the whole resized
embedding matrix with AdamW, zeroes the old rows' gradient, runs the full model with the
LM head and hidden states on both passes, in fp32 on CPU. Ours trains only the new rows
and stops at the target layer. Steps alternate between the two on the same batches so
machine noise hits both alike; the table reports ratios.

    python bench/bench_distill_step.py --steps 6 --batch-size 16 --snippet-len 50
"""

from __future__ import annotations

import argparse
import glob
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tokdist_ray.config import DistillationConfig
from tokdist_ray.data.local_mining import mine_snippets
from tokdist_ray.training.batching import collate, merge_snippets
from tokdist_ray.training.rows import pre_init_rows
from tokdist_ray.training.schedule import make_optimizer
from tokdist_ray.training.step import NewRows, TokenDistiller, bf16_supported
from tokdist_ray.vocab.alignment import PhraseMerger
from tokdist_ray.vocab.models import load_model, resolve_model_path
from tokdist_ray.vocab.selection import frequent_fragmented_words
from tokdist_ray.vocab.tokens import select_new_tokens

DOCS = "/usr/share/doc/python3.11/html/_sources/**/*.txt"


def snippets_for_benchmark(tokenizer, n_tokens: int, snippet_len: int, per_token: int):
    texts = [open(f, encoding="utf-8").read() for f in sorted(glob.glob(DOCS, recursive=True))]
    words = [w for w, _ in frequent_fragmented_words(tokenizer, texts, n_tokens)]
    tokens = select_new_tokens(tokenizer, words).tokens
    rows, _ = mine_snippets(texts, tokenizer, tokens, snippet_len, per_token)
    return tokens, [r["input_ids"] for r in rows]


class ReferenceStep:
    """Full-matrix training as the reference does it."""

    def __init__(self, model, new_start, tokens, lr):
        self.model, self.new_start = model, new_start
        phrases = [t.phrase_ids for t in tokens]
        model.resize_token_embeddings(new_start + len(tokens), mean_resizing=False)
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            emb[new_start:] = pre_init_rows(emb[:new_start], phrases)
        emb.requires_grad_(True)
        model.get_output_embeddings().weight.requires_grad_(True)
        params = {id(p): p for p in (emb, model.get_output_embeddings().weight)}.values()
        self.optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0)

    def __call__(self, batch):
        mask = batch["student_mask"]
        student = self.model(batch["student_ids"], output_hidden_states=True).hidden_states[-1]
        with torch.no_grad():
            teacher = self.model(batch["teacher_ids"], output_hidden_states=True).hidden_states[-1]
        aligned = teacher.gather(1, batch["teacher_index"][..., None].expand(-1, -1, teacher.size(-1)))
        loss = F.mse_loss(student[mask], aligned[mask])
        loss.backward()
        self.model.get_input_embeddings().weight.grad[: self.new_start] = 0
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def state_bytes(self):
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values())


class OurStep:
    def __init__(self, model, new_start, tokens, cfg):
        rows = NewRows(pre_init_rows(model.get_input_embeddings().weight, [t.phrase_ids for t in tokens]))
        self.distiller = TokenDistiller(model, rows, new_start, cfg.loss_methods, cfg.target_layer, cfg.mixed_precision)
        self.optimizer, _ = make_optimizer(list(rows.parameters()), cfg, 1)

    def __call__(self, batch):
        loss = self.distiller(batch)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def state_bytes(self):
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values())


class TeacherPass:
    """The teacher's forward pass alone (no grad, no LM head): every Token Distillation
    step runs it, so its time bounds any step's speed-up in the same precision."""

    def __init__(self, model):
        self.decoder = model.get_decoder()

    @torch.no_grad()
    def __call__(self, batch):
        return self.decoder(input_ids=batch["teacher_ids"]).last_hidden_state

    def state_bytes(self):
        return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--snippet-len", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path("bundled:smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens, snippets = snippets_for_benchmark(tokenizer, args.tokens, args.snippet_len, 100)
    new_start = len(tokenizer)
    merger = PhraseMerger.for_tokens(tokens, new_start)
    examples = merge_snippets(merger, snippets)
    batches = [collate(examples[i * args.batch_size : (i + 1) * args.batch_size]) for i in range(args.steps + 1)]

    cfg = DistillationConfig(batch_size=args.batch_size)
    ref = ReferenceStep(load_model(path, dtype=torch.float32), new_start, tokens, cfg.learning_rate)
    ours = OurStep(load_model(path, dtype=torch.float32), new_start, tokens, cfg)
    teacher = TeacherPass(ours.distiller.model)
    steps = {"reference": ref, "tokdist-ray": ours, "teacher pass alone": teacher}
    times = {name: [] for name in steps}
    for i, batch in enumerate(batches):  # the first step of each is warm-up
        for name, step in steps.items():
            t = time.perf_counter()
            step(batch)
            if i:
                times[name].append(time.perf_counter() - t)

    print(f"SmolLM2-135M, batch {args.batch_size}, snippet_len {args.snippet_len}, {len(tokens)} new tokens, "
          f"{args.steps} timed steps each, torch threads {torch.get_num_threads()}, "
          f"bf16 autocast {'on' if bf16_supported(torch.device('cpu')) else 'off (no native bf16 on this CPU)'}")
    print("| step | s/step (median) | snippets/s | optimizer state |")
    print("|---|---:|---:|---:|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, step in steps.items():
        print(f"| {name} | {med[name]:.3f} | {args.batch_size / med[name]:.2f} | {step.state_bytes() / 2**20:.2f} MiB |")
    print(f"speed-up: {med['reference'] / med['tokdist-ray']:.2f}x (the teacher pass alone bounds it at "
          f"{med['reference'] / med['teacher pass alone']:.2f}x in this precision); "
          f"optimizer state: {ref.state_bytes() / ours.state_bytes():.0f}x smaller")
    split = [ours.distiller.shared_prefix(b["student_ids"], b["student_mask"]) for b in batches]
    print(f"student positions skipped by prefix reuse per batch (of {batches[0]['student_ids'].shape[1]}): {split}")


if __name__ == "__main__":
    main()
