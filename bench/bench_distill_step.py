"""Distillation step throughput on SmolLM2-135M: tokdist-ray's step vs the reference's.

The reference step (re-implemented here for measurement) trains the whole resized
embedding matrix with AdamW, zeroes the old rows' gradient, runs the full model with the
LM head and hidden states on both passes, in fp32 on CPU. Ours trains only the new rows
and stops at the target layer. Steps alternate between the two so machine noise hits
both alike; the table reports ratios.

Each side gets its snippets as it makes them, from the same corpus and words: the
reference's are windows of original ids around each word's phrase, merged greedily
(longest phrase first) into one new id per word, a row per word; ours are windows of the
expanded tokenizer's ids (`expand_with_merges`), the teacher reading each new id as its
pieces (`PieceAligner`), a row per new id: the words plus the intermediate merge tokens
they need, so our side may train more rows than there are words.

    python bench/bench_distill_step.py --steps 6 --batch-size 16 --snippet-len 50
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tokdist_ray.config import DistillationConfig
from tokdist_ray.data.mining.local_mining import mine_snippets
from tokdist_ray.data.snippets import bos_prefix, window_around
from tokdist_ray.training.batching import align_snippets, collate
from tokdist_ray.training.rows import pre_init_rows
from tokdist_ray.training.schedule import make_optimizer
from tokdist_ray.training.step import NewRows, TokenDistiller, bf16_supported
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model, resolve_model_path
from tokdist_ray.vocab.selection import frequent_fragmented_words
from tokdist_ray.vocab.tokens import select_new_tokens

DOCS = "/usr/share/doc/python3.11/html/_sources/**/*.txt"


def benchmark_words(tokenizer, n_tokens: int) -> tuple[list[str], list[str]]:
    texts = [open(f, encoding="utf-8").read() for f in sorted(glob.glob(DOCS, recursive=True))]
    return texts, [w for w, _ in frequent_fragmented_words(tokenizer, texts, n_tokens)]


# ---------------------------------------------------------------------- the reference's side
class ReferenceMerger:
    """The reference's phrase merge: greedy left to right, longest phrase first, over a
    trie of original ids (what tokdist-ray's PhraseMerger did before snippets moved to the
    expanded tokenizer's ids)."""

    _END = -1

    def __init__(self, phrases):
        self._trie: dict = {}
        for index, phrase in enumerate(phrases):
            node = self._trie
            for token_id in phrase:
                node = node.setdefault(int(token_id), {})
            node[self._END] = index

    def occurrences(self, ids):
        """(start, length, token index) of every phrase the merge replaces."""
        found, i = [], 0
        while i < len(ids):
            node, best = self._trie, None
            for j in range(i, len(ids)):
                node = node.get(ids[j])
                if node is None:
                    break
                if self._END in node:
                    best = (node[self._END], j - i + 1)
            if best is None:
                i += 1
            else:
                found.append((i, best[1], best[0]))
                i += best[1]
        return found


def reference_snippets(texts, tokenizer, tokens, snippet_len: int, per_token: int) -> list[list[int]]:
    """Windows of `snippet_len` original ids around each phrase, the first `per_token`
    distinct ones per token in corpus order (the package's miner before the change)."""
    merger, prefix = ReferenceMerger([t.phrase_ids for t in tokens]), bos_prefix(tokenizer)
    counts, seen, snippets = [0] * len(tokens), set(), []
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            for pos, length, index in merger.occurrences(ids):
                if counts[index] >= per_token:
                    continue
                window, _ = window_around(ids, pos, length, snippet_len)
                snippet = tuple(prefix + window)
                if snippet not in seen:
                    seen.add(snippet)
                    snippets.append(list(snippet))
                    counts[index] += 1
        if min(counts) >= per_token:
            break
    return snippets


def reference_examples(merger: ReferenceMerger, new_start: int, snippets) -> list[dict]:
    """Teacher: the original ids; student: each phrase merged into its new id."""
    examples = []
    for ids in snippets:
        student, positions, i = [], [], 0
        for start, length, index in merger.occurrences(ids):
            student += ids[i:start] + [new_start + index]
            positions += list(range(i, start)) + [start + length - 1]
            i = start + length
        student += ids[i:]
        positions += list(range(i, len(ids)))
        examples.append({"teacher_ids": list(ids), "student_ids": student, "teacher_index": positions})
    return examples


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
        self.distiller = TokenDistiller.from_config(model, rows, new_start, cfg)
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
    texts, words = benchmark_words(tokenizer, args.tokens)
    new_start = len(tokenizer)

    # the reference: original ids, phrases merged into one new id (and one row) per word
    ref_tokens = select_new_tokens(tokenizer, words).tokens
    ref_snippets = reference_snippets(texts, tokenizer, ref_tokens, args.snippet_len, 100)
    ref_examples = reference_examples(ReferenceMerger([t.phrase_ids for t in ref_tokens]), new_start, ref_snippets)

    # ours: the expanded tokenizer's ids, a row per new id (words and intermediate merges)
    expansion = expand_with_merges(tokenizer, words)
    assert expansion.new_start == new_start
    tokens = expansion.tokens
    rows, _ = mine_snippets(texts, expansion, args.snippet_len, 100)
    examples = align_snippets(PieceAligner.for_tokens(tokens, new_start), [r["input_ids"] for r in rows])

    def batched(examples):
        return [collate(examples[i * args.batch_size : (i + 1) * args.batch_size]) for i in range(args.steps + 1)]

    batches, ref_batches = batched(examples), batched(ref_examples)
    n_used = (args.steps + 1) * args.batch_size
    used = {"reference": ref_examples[:n_used], "tokdist-ray": examples[:n_used], "teacher pass alone": examples[:n_used]}
    # the reference's loss, as the step is compared with the reference's
    cfg = DistillationConfig(batch_size=args.batch_size, loss_methods=["MSE-on-hiddens"])
    ref = ReferenceStep(load_model(path, dtype=torch.float32), new_start, ref_tokens, cfg.learning_rate)
    ours = OurStep(load_model(path, dtype=torch.float32), new_start, tokens, cfg)
    teacher = TeacherPass(ours.distiller.model)
    steps = {"reference": ref, "tokdist-ray": ours, "teacher pass alone": teacher}
    inputs = {"reference": ref_batches, "tokdist-ray": batches, "teacher pass alone": batches}
    if bf16_supported(torch.device("cpu")):  # the default step autocasts to bf16 here: fp32 beside it
        fp32 = dataclasses.replace(cfg, mixed_precision=False)
        steps["tokdist-ray, fp32"] = OurStep(load_model(path, dtype=torch.float32), new_start, tokens, fp32)
        inputs["tokdist-ray, fp32"], used["tokdist-ray, fp32"] = batches, used["tokdist-ray"]
    times = {name: [] for name in steps}
    for i in range(len(batches)):  # the first step of each is warm-up
        for name, step in steps.items():
            t = time.perf_counter()
            step(inputs[name][i])
            if i:
                times[name].append(time.perf_counter() - t)

    print(f"SmolLM2-135M, batch {args.batch_size}, snippet_len {args.snippet_len}, {len(words)} words, "
          f"{args.steps} timed steps each, torch threads {torch.get_num_threads()}, "
          f"bf16 autocast {'on' if bf16_supported(torch.device('cpu')) else 'off (no native bf16 on this CPU)'}")
    print(f"new rows: reference {len(ref_tokens)} (one per word); tokdist-ray {len(tokens)} = "
          f"{expansion.n_requested} words + {len(expansion.intermediates)} intermediate merge tokens"
          + (f" + {len(expansion.added_tokens)} added tokens" if expansion.added_tokens else "")
          + (f" ({len(expansion.skipped)} words skipped by the merges)" if expansion.skipped else ""))
    print("| step | new rows | teacher / student ids per snippet | s/step (median) | snippets/s | optimizer state |")
    print("|---|---:|---:|---:|---:|---:|")
    med = {k: statistics.median(v) for k, v in times.items()}
    n_rows = {"reference": len(ref_tokens), "tokdist-ray": len(tokens), "tokdist-ray, fp32": len(tokens),
              "teacher pass alone": "-"}
    for name, step in steps.items():
        teacher_len = statistics.mean(len(e["teacher_ids"]) for e in used[name])
        student_len = statistics.mean(len(e["student_ids"]) for e in used[name])
        lengths = f"{teacher_len:.1f} / " + (f"{student_len:.1f}" if name != "teacher pass alone" else "-")
        print(f"| {name} | {n_rows[name]} | {lengths} | {med[name]:.3f} | {args.batch_size / med[name]:.2f} | "
              f"{step.state_bytes() / 2**20:.2f} MiB |")
    print(f"speed-up: {med['reference'] / med['tokdist-ray']:.2f}x (the teacher pass alone bounds it at "
          f"{med['reference'] / med['teacher pass alone']:.2f}x in this precision); "
          f"optimizer state: {ref.state_bytes() / ours.state_bytes():.0f}x smaller")
    split = [ours.distiller.shared_prefix(b["student_ids"], b["student_mask"]) for b in batches]
    print(f"student positions skipped by prefix reuse per batch (of {batches[0]['student_ids'].shape[1]}): {split}")


if __name__ == "__main__":
    main()
