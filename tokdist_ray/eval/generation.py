"""What an expansion buys at generation time: the original and the expanded model continue
the same held-out prompts with the same settings, side by side.

Each model decodes a fixed number of steps (EOS suppressed), so the steps are equal and
the text differs: bytes per decode step is the saving a user sees, bytes per second what
it is worth on this hardware (the expanded LM head is larger). A model that never emits
its new tokens saves nothing while generating, whatever its tokenizer saves on held-out
text; hence the new-token share of generated ids next to that of the held-out encoding.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Sequence

import torch

from tokdist_ray.eval.bits_per_byte import heldout_chunks
from tokdist_ray.eval.compression import leading_texts
from tokdist_ray.eval.metrics import Metric, Part
from tokdist_ray.eval.plots import pyplot, save
from tokdist_ray.export.hf import write_method_rows
from tokdist_ray.vocab.special import start_token

log = logging.getLogger("tokdist_ray")

MODES = {"greedy": {"do_sample": False}, "sampled": {"do_sample": True, "temperature": 0.8, "top_p": 0.95}}


def prompts_from(texts: Sequence[str], n_prompts: int, prompt_bytes: int) -> list[str]:
    """The first `n_prompts` texts long enough, each cut to about `prompt_bytes` bytes of
    UTF-8 before a space (byte-level BPE attaches a space to the word after it)."""
    prompts = []
    for text in texts:
        if len(prompts) == n_prompts:
            break
        head = text.encode("utf-8")[: 2 * prompt_bytes].decode("utf-8", errors="ignore").strip()
        if len(head.encode("utf-8")) < prompt_bytes:
            continue
        cut = head.encode("utf-8")[:prompt_bytes].decode("utf-8", errors="ignore")
        prompts.append(cut[: cut.rfind(" ")] if " " in cut else cut)
    return prompts


def _batch(tokenizer, prompts: Sequence[str], device) -> dict[str, torch.Tensor]:
    """Left-padded ids after the start token, as the held-out scoring reads text."""
    start = start_token(tokenizer)
    ids = [[start, *x] for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return {"input_ids": input_ids, "attention_mask": mask}


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def original_vocabulary(model, new_start: int):
    """The expanded `model` as the original: its tables cut to the first `new_start` rows
    (views: no copy; the old rows are the original's bit for bit), restored on exit. Lets
    the two sides be timed in alternation, on one copy of the weights."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    full_input, full_head = embeddings.weight, head.weight
    embeddings.weight = torch.nn.Parameter(full_input[:new_start], requires_grad=False)
    head.weight = embeddings.weight if full_head is full_input else torch.nn.Parameter(full_head[:new_start],
                                                                                      requires_grad=False)
    try:
        yield model
    finally:
        embeddings.weight, head.weight = full_input, full_head


def _timed(fn, device):
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return result, time.perf_counter() - start


@torch.no_grad()
def _side(model, tokenizer, prompts: Sequence[str], steps: int, seed: int) -> dict:
    """One timed round: prefill, then `steps` decode steps per prompt in each mode."""
    batch = _batch(tokenizer, prompts, model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(batch["input_ids"][0, 0])
    settings = {"max_new_tokens": steps, "min_new_tokens": steps, "pad_token_id": pad}
    round_ = {"prompt_tokens": int(batch["attention_mask"].sum()) - len(prompts),
              "prefill_s": _timed(lambda: model(**batch, use_cache=False), model.device)[1]}
    for mode, sampling in MODES.items():
        torch.manual_seed(seed)
        generated, seconds = _timed(lambda: model.generate(**batch, **settings, **sampling), model.device)
        round_[mode] = (generated[:, batch["input_ids"].shape[1]:], seconds)
    return round_


def _summary(rounds: list[dict], tokenizer, prompts: Sequence[str], new_start: int | None) -> dict:
    """The fastest of the rounds (the least disturbed by other work on the machine)."""
    prompt_bytes = sum(len(p.encode("utf-8")) for p in prompts)
    prefill_s = min(r["prefill_s"] for r in rounds)
    out = {"prompts": len(prompts), "prompt_bytes": prompt_bytes, "prompt_tokens": rounds[0]["prompt_tokens"],
           "prefill_s": prefill_s, "prefill_bytes_per_s": prompt_bytes / prefill_s, "rounds": len(rounds)}
    for mode in MODES:
        generated = rounds[0][mode][0]
        seconds = min(r[mode][1] for r in rounds)
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        n_bytes, n_steps = sum(len(t.encode("utf-8")) for t in texts), generated.numel()
        out[mode] = {"decode_steps": n_steps, "seconds": seconds, "bytes": n_bytes,
                     "bytes_per_step": n_bytes / n_steps, "bytes_per_s": n_bytes / seconds,
                     "steps_per_s": n_steps / seconds, "sample": texts[0]}
        if new_start is not None:
            out[mode]["new_token_share"] = (generated >= new_start).sum().item() / n_steps
    return out


def compare_generation(model, original_tokenizer, expanded_tokenizer, new_start: int, prompts: Sequence[str],
                       steps: int, seed: int, rounds: int = 3) -> dict:
    """The expanded `model` (its new rows written) against the original it extends, on
    the same prompts and settings, timed in alternation for `rounds` rounds after a
    warm-up of each: {"original": ..., "expanded": ..., "ratios": ...}."""
    model.eval()
    sides = {"original": (original_tokenizer, None), "expanded": (expanded_tokenizer, new_start)}
    timed: dict[str, list] = {name: [] for name in sides}
    for i in range(rounds + 1):
        for name, (tokenizer, _) in sides.items():
            with original_vocabulary(model, new_start) if name == "original" else nullcontext():
                result = _side(model, tokenizer, prompts, steps if i else 2, seed)
            if i:  # round 0 warms both up
                timed[name].append(result)
    out = {name: _summary(timed[name], tokenizer, prompts, first_new) for name, (tokenizer, first_new) in sides.items()}
    return out | {"ratios": ratios(out["original"], out["expanded"])}


def heldout_new_token_share(tokenizer, texts: Sequence[str], new_start: int) -> float:
    ids = [i for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for i in x]
    return sum(i >= new_start for i in ids) / max(1, len(ids))


def markdown_table(report: dict) -> str:
    """Original against expanded, per mode; ratios are expanded / original."""
    lines = ["| mode | model | bytes/step | bytes/s | steps/s | new-token share (generated / held-out) |",
             "|---|---|---:|---:|---:|---:|"]
    share = report["heldout_new_token_share"]
    for mode in MODES:
        for side in ("original", "expanded"):
            r = report[side][mode]
            new = f"{100 * r['new_token_share']:.1f}% / {100 * share:.1f}%" if "new_token_share" in r else "–"
            lines.append(f"| {mode} | {side} | {r['bytes_per_step']:.2f} | {r['bytes_per_s']:.0f} | "
                         f"{r['steps_per_s']:.1f} | {new} |")
        ratio = report["ratios"][mode]
        lines.append(f"| {mode} | expanded / original | {ratio['bytes_per_step']:.3f} | {ratio['bytes_per_s']:.3f} | "
                     f"{ratio['steps_per_s']:.3f} | |")
    prefill = report["ratios"]["prefill_bytes_per_s"]
    lines.append(f"\nPrefill: {report['expanded']['prompt_tokens']} tokens against {report['original']['prompt_tokens']} "
                 f"for the same {report['original']['prompt_bytes']} bytes of prompts; bytes/s expanded / original {prefill:.3f}.")
    return "\n".join(lines)


def ratios(original: dict, expanded: dict) -> dict:
    out = {mode: {k: expanded[mode][k] / original[mode][k] for k in ("bytes_per_step", "bytes_per_s", "steps_per_s")}
           for mode in MODES}
    out["prefill_bytes_per_s"] = expanded["prefill_bytes_per_s"] / original["prefill_bytes_per_s"]
    return out


def plot_speed(report: dict, out_dir: Path) -> str:
    """Bytes per decode step and per second, original against expanded, per mode."""
    fig, axes = pyplot().subplots(1, 2, figsize=(8, 3.5))
    for ax, metric, label in zip(axes, ("bytes_per_step", "bytes_per_s"), ("bytes of text per decode step",
                                                                              "bytes of text per second")):
        for i, side in enumerate(("original", "expanded")):
            ax.bar([x + 0.4 * i for x in range(len(MODES))], [report[side][m][metric] for m in MODES], 0.4, label=side)
        ax.set_xticks([x + 0.2 for x in range(len(MODES))], list(MODES))
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle("Generation from held-out prompts (higher is better)")
    return save(fig, out_dir / "generation.png")


class Generation(Metric):
    """The original against the expanded model (Token Distillation's rows written) on
    held-out prompts, on the first worker only: timings are not split."""

    name = "generation"

    def score(self, part: Part) -> dict:
        evaluation, settings = part.evaluation, part.evaluation.settings
        if part.index or not settings.generation_steps:
            return {}
        expansion, new_start = evaluation.expansion, evaluation.expansion.new_start
        # from chunks, not documents: a corpus file may be one document
        chunks = heldout_chunks(part.texts, max(settings.chunk_bytes, 2 * settings.prompt_bytes))
        prompts = prompts_from(chunks, settings.generation_prompts, settings.prompt_bytes)
        if not prompts:
            log.warning("generation: skipped; no held-out text holds eval.prompt_bytes (%d bytes) for a prompt",
                        settings.prompt_bytes)
            return {}
        write_method_rows(part.model, new_start, part.rows["input"], part.rows.get("output"), part.tied)
        log.info("generation: %d held-out prompts, %d decode steps each, greedy and sampled, original and expanded",
                 len(prompts), settings.generation_steps)
        return {"generation": {
            "decode_steps_per_prompt": settings.generation_steps,
            "heldout_new_token_share": heldout_new_token_share(expansion.tokenizer, leading_texts(part.texts), new_start),
            **compare_generation(part.model, part.original, expansion.tokenizer, new_start, prompts,
                                 settings.generation_steps, evaluation.seed, settings.generation_rounds),
        }}

    def merge(self, parts: list[dict], new_start: int) -> dict:
        return {"generation": parts[0]["generation"]} if "generation" in parts[0] else {}

    def sections(self, report: dict) -> list[str]:
        if "generation" not in report:
            return []
        return ["## Generation from held-out prompts, the same decode steps (expanded: Token Distillation's rows)\n\n"
                + markdown_table(report["generation"])]

    def plots(self, report: dict, out_dir: Path) -> list[str]:
        return [plot_speed(report["generation"], out_dir)] if "generation" in report else []
