"""A whole run, end to end, against the reference's on its own kind of workload: 16 new
words x 32 snippets of 50 ids mined from a corpus, one epoch at the training defaults
both share (batch 1, lr 1e-4), side by side in one invocation, each side a fresh process.

The reference side re-implements `TokenDistillation.run` with an `HFDataSource` on a CPU
(the reference itself refuses to start without CUDA): load the model in fp32, add the
words as added tokens, tokenise the whole corpus (it tokenises `max_docs` documents
before it looks for a snippet), collect twice the snippets per word with Aho-Corasick on
ids, cut windows around each phrase, shuffle, keep the first 32; save the resized model,
reload it, train the whole embedding matrix with AdamW through the full model and LM head
(student and teacher), old rows' gradient zeroed, and save the model. Its on-disk
tokenised-corpus cache (written on a first run) is not modelled, which favours it.

tokdist-ray's side is the job users run (`jobs/expand_vocab.py`) with the same words,
corpus and snippet settings, everything else at its defaults: Ray started by the job,
mining on Ray Data, distillation on Ray Train, the output fit, pruning and the export;
no evaluation (the reference has none). Its stages' own seconds come from job.json.

    python bench/bench_reference_cost.py [--corpus PATH ...] [--tokens 16 --snippets 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

FRENCH = ["/usr/share/debian-reference/debian-reference.fr.txt.gz",
          "/usr/share/developers-reference/fr/developers-reference.txt.gz",
          "/usr/share/doc/debian/FAQ/debian-faq.fr.txt.gz", "runs/french-corpus/man"]
TOKENIZATION_BATCH = 16_000  # the reference's HFDataSource.tokenization_batch_size


def corpus_texts(paths: list[str]) -> list[str]:
    from tokdist_ray.config import FileDataSource
    from tokdist_ray.data.corpus.corpus import documents

    return [d for d in documents(FileDataSource(paths=paths)) if isinstance(d, str)]


def choose_words(paths: list[str], n: int) -> list[str]:
    """n words the model cuts into 3+ pieces, at evenly spaced ranks of the ids they would save."""
    from tokdist_ray.vocab.models import load_tokenizer, resolve_model_path
    from tokdist_ray.vocab.selection import frequent_fragmented_words

    tokenizer = load_tokenizer(resolve_model_path("bundled:smollm2"))
    ranked = frequent_fragmented_words(tokenizer, corpus_texts(paths), 50 * n, min_count=200)
    step = max(1, len(ranked) // n)
    return [w for w, _ in ranked[::step][:n]]


# ---------------------------------------------------------------------- the reference's run
def reference_snippets(docs_ids, tokens, snippet_len: int, per_token: int, seed: int) -> list[list[list[int]]]:
    """Per word: windows of `snippet_len` ids around its phrase, `2 x per_token` collected in
    corpus order with +-2 x snippet_len ids of context, shuffled, the first `per_token` kept."""
    import ahocorasick

    automaton = ahocorasick.Automaton(ahocorasick.STORE_ANY, ahocorasick.KEY_SEQUENCE)
    for index, token in enumerate(tokens):
        automaton.add_word(tuple(token.phrase_ids), (index, len(token.phrase_ids)))
    automaton.make_automaton()
    collected: list[list[list[int]]] = [[] for _ in tokens]
    for ids in docs_ids:
        for end, (index, length) in automaton.iter(tuple(ids)):
            if len(collected[index]) >= 2 * per_token:
                continue
            start = end + 1 - length
            context = ids[max(0, start - 2 * snippet_len) : end + 1 + 2 * snippet_len]
            at = start - max(0, start - 2 * snippet_len)
            free = snippet_len - length
            before = min(at, free // 2)
            after = min(len(context) - at - length, free - before)
            collected[index].append(context[at - before : at + length + after])
        if all(len(c) >= 2 * per_token for c in collected):
            break
    rng = random.Random(seed)
    for windows in collected:
        rng.shuffle(windows)
    return [[w for w in windows if len(w) >= snippet_len][:per_token] for windows in collected]


def run_reference(words: list[str], paths: list[str], snippet_len: int, per_token: int, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_distill_step import ReferenceMerger, ReferenceStep, reference_examples

    from tokdist_ray.data.snippets import bos_prefix
    from tokdist_ray.training.batching import collate
    from tokdist_ray.vocab.models import resolve_model_path
    from tokdist_ray.vocab.tokens import select_new_tokens

    seconds, t = {}, time.perf_counter()
    path = resolve_model_path("bundled:smollm2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = select_new_tokens(tokenizer, words).tokens
    new_start = len(tokenizer)
    seconds["load"], t = time.perf_counter() - t, time.perf_counter()

    texts = corpus_texts(paths)
    docs_ids = [ids for lo in range(0, len(texts), TOKENIZATION_BATCH)
                for ids in tokenizer(texts[lo : lo + TOKENIZATION_BATCH], add_special_tokens=False)["input_ids"]]
    seconds["tokenise corpus"], t = time.perf_counter() - t, time.perf_counter()
    prefix = bos_prefix(tokenizer)
    groups = reference_snippets(docs_ids, tokens, snippet_len, per_token, seed=42)
    snippets = [prefix + w for group in groups for w in group]
    seconds["collect snippets"], t = time.perf_counter() - t, time.perf_counter()

    ReferenceStep(model, new_start, tokens, 1e-4)  # resized, the new rows FVT-initialised
    tokenizer.add_tokens([token.text for token in tokens])
    temp = out / "temp-extended"
    model.save_pretrained(temp)
    tokenizer.save_pretrained(temp)
    model = AutoModelForCausalLM.from_pretrained(temp, dtype=torch.float32)
    step = ReferenceStep(model, new_start, tokens, 1e-4)  # its rows already set; AdamW on the whole matrix
    seconds["save and reload"], t = time.perf_counter() - t, time.perf_counter()

    examples = reference_examples(ReferenceMerger([token.phrase_ids for token in tokens]), new_start, snippets)
    random.Random(42).shuffle(examples)
    model.train()
    for example in examples:  # batch 1, one epoch
        step(collate([example]))
    seconds["train"], t = time.perf_counter() - t, time.perf_counter()
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    seconds["save"] = time.perf_counter() - t
    return {"seconds": seconds, "snippets": len(snippets), "tokens": len(tokens), "steps": len(examples)}


# ---------------------------------------------------------------------- tokdist-ray's run
def job_config(words: list[str], paths: list[str], snippet_len: int, per_token: int, run_dir: Path) -> dict:
    return {"model": "bundled:smollm2", "run_dir": str(run_dir), "tokens": {"list": words},
            "data": {"source": "files", "paths": [str(Path(p).resolve()) if not p.startswith("/") else p for p in paths]},
            "snippets": {"snippet_len": snippet_len, "snippets_per_token": per_token}}


def timed(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", nargs="+", default=FRENCH)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--snippets", type=int, default=32)
    ap.add_argument("--snippet-len", type=int, default=50)
    ap.add_argument("--out", default="runs/bench-reference-cost")
    ap.add_argument("--sides", nargs="+", default=["reference", "tokdist-ray"], choices=["reference", "tokdist-ray"])
    ap.add_argument("--side", help=argparse.SUPPRESS)  # the reference's run, in its own process
    ap.add_argument("--words", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.side == "reference":
        report = run_reference(args.words, args.corpus, args.snippet_len, args.snippets, out / "reference")
        (out / "reference.json").write_text(json.dumps(report, indent=1))
        return

    out.mkdir(parents=True, exist_ok=True)
    words = choose_words(args.corpus, args.tokens)
    print(f"words: {words}", flush=True)
    walls = {}
    for side in args.sides:
        if side == "reference":
            walls[side] = timed([sys.executable, __file__, "--side", "reference", "--out", str(out), "--corpus",
                                 *args.corpus, "--snippets", str(args.snippets), "--snippet-len", str(args.snippet_len),
                                 "--words", *words])
        else:
            run_dir = Path(tempfile.mkdtemp(prefix="tokdist-", dir=out))
            config = run_dir / "job.yaml"
            config.write_text(yaml.safe_dump(job_config(words, args.corpus, args.snippet_len, args.snippets, run_dir)))
            walls[side] = timed([sys.executable, "jobs/expand_vocab.py", "--config", str(config)],
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
            job = json.loads((run_dir / "job.json").read_text())
            training = json.loads((run_dir / "rows" / "training.json").read_text())["training"]
            fit = json.loads((run_dir / "rows" / "output_fit.json").read_text())
            (out / "tokdist-ray.json").write_text(json.dumps({
                "seconds": {**job["stage_seconds"], "of which training": training["seconds"],
                            "of which the output fit": fit.get("seconds", 0.0)},
                "snippets": training["snippets"], "steps": training["steps"]}, indent=1))
        print(f"{side}: {walls[side]:.1f} s", flush=True)
    print(f"\n{machine()}\n\n| side | wall s | snippets | steps | seconds by part |\n|---|---:|---:|---:|---|")
    for side in walls:
        detail = json.loads((out / f"{side}.json").read_text())
        parts = ", ".join(f"{k} {v:.1f}" for k, v in detail["seconds"].items())
        print(f"| {side} | {walls[side]:.1f} | {detail['snippets']} | {detail['steps']} | {parts} |")
    if len(walls) == 2:
        print(f"\ntokdist-ray / reference wall time: {walls['tokdist-ray'] / walls['reference']:.3f}")


def machine() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    debian = Path("/etc/debian_version")
    return (f"{os.cpu_count()} CPUs, flags {' '.join(sorted(flags))}, "
            f"Debian {debian.read_text().strip() if debian.exists() else '?'}")

if __name__ == "__main__":
    main()
