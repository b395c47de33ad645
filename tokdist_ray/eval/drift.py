"""Held-out drift: how far the expanded model strays from the original on text it never
trained on, for Token Distillation's rows and for the cheap baselines, in one pass.

For each held-out snippet the original model reads the original ids (the teacher) and the
expanded model reads the merged ids (the student). From the first new token on, at the
aligned positions, we measure last-layer and target-layer hidden-state MSE and the KL
divergence of next-token distributions over the original vocabulary. Positions before
the first new token are identical by construction and would only dilute the averages.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from tokdist_ray.console import StageProgress
from tokdist_ray.training.batching import collate
from tokdist_ray.training.rows import pre_init_rows
from tokdist_ray.training.step import NewRows, TokenDistiller
from tokdist_ray.vocab.models import ties_word_embeddings
from tokdist_ray.vocab.tokens import NewToken

METRICS = ("hidden_mse", "target_mse", "kl")


def baseline_rows(model, tokens: Sequence[NewToken], new_start: int, side: str = "input") -> dict[str, torch.Tensor]:
    """The rows of the heuristics Token Distillation is compared with, from the input
    table, or from an untied model's output table (`side="output"`; {} for tied models)."""
    if side == "output" and ties_word_embeddings(model):
        return {}
    table = (model.get_input_embeddings() if side == "input" else model.get_output_embeddings()).weight[:new_start]
    phrases = [t.phrase_ids for t in tokens]
    return {
        "fvt": pre_init_rows(table, phrases, "fvt", side),
        "adapti-vocab": pre_init_rows(table, phrases, "adapti-vocab", side),
        # the row resize_token_embeddings centres new rows on: the mean of all rows
        "mean_embedding": table.float().mean(0).expand(len(phrases), -1).clone(),
    }


def _from_first_new_token(student_ids: torch.Tensor, mask: torch.Tensor, new_start: int) -> torch.Tensor:
    is_new = (student_ids >= new_start) & mask
    return (is_new.cumsum(dim=1) > 0) & mask


def _original_log_probs(hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """Log-probabilities over the original vocabulary in fp32, whatever the model's dtype:
    bf16 logits would be rounded to 3 significant digits (0.125 apart near 20), noise as
    large as the KL between good rows. An fp32 model computes what it always did."""
    return torch.log_softmax(F.linear(hidden.float(), *head), -1)


@torch.no_grad()
def drift_sums(
    model,
    new_start: int,
    methods: dict[str, torch.Tensor],
    examples: Sequence[dict],
    token_of_example: Sequence[str],
    target_layer: int = -1,
    batch_size: int = 16,
    label: str = "",
) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {"overall" or a token: {metric: sum over positions, "positions": count}}}.

    Sums, not means: the sums over disjoint parts of the snippets add up (`add_sums`) to
    the sums over all of them, whose means (`drift_means`) are the whole's."""
    distillers = {
        name: TokenDistiller(model, NewRows(rows), new_start, ("MSE-on-hiddens",), target_layer, mixed_precision=False)
        for name, rows in methods.items()
    }
    anyone = next(iter(distillers.values()))
    need_target = anyone.target != anyone.n_layers
    out_head = model.get_output_embeddings()
    bias = getattr(out_head, "bias", None)
    # one fp32 copy of the original vocabulary's rows on a bf16 model (none on an fp32 one)
    head = (out_head.weight[:new_start].float(), None if bias is None else bias[:new_start].float())
    sums = {name: defaultdict(lambda: defaultdict(float)) for name in methods}
    progress = StageProgress(f"drift of {len(methods)} methods{label}", len(examples), "held-out snippets")
    for lo in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[lo : lo + batch_size]).items()}
        keep = _from_first_new_token(batch["student_ids"], batch["student_mask"], new_start)
        t_target, t_final, _ = anyone.hidden_states(need_target, True, input_ids=batch["teacher_ids"])

        def aligned(x):
            return x.gather(1, batch["teacher_index"][..., None].expand(-1, -1, x.size(-1)))

        t_final = aligned(t_final)
        t_logp = _original_log_probs(t_final, head)
        t_target = aligned(t_target) if need_target else t_final
        for name, d in distillers.items():
            s_target, s_final, _ = d.hidden_states(need_target, True, inputs_embeds=d.embed_student(batch["student_ids"]))
            s_target = s_target if need_target else s_final
            s_logp = _original_log_probs(s_final, head)
            per_position = {  # in fp32 (no-ops on an fp32 model)
                "hidden_mse": (s_final.float() - t_final.float()).pow(2).mean(-1),
                "target_mse": (s_target.float() - t_target.float()).pow(2).mean(-1),
                "kl": (t_logp.exp() * (t_logp - s_logp)).sum(-1),
            }
            for row in range(len(keep)):
                token = token_of_example[lo + row]
                n = int(keep[row].sum())
                for key in ("overall", token):
                    sums[name][key]["positions"] += n
                    for metric, values in per_position.items():
                        sums[name][key][metric] += float(values[row][keep[row]].sum())
        progress.advance(len(keep))
    return {name: {key: dict(acc) for key, acc in per_key.items()} for name, per_key in sums.items()}


def add_sums(parts: Iterable[dict]) -> dict:
    """`drift_sums` of disjoint parts of the snippets, added up (keys in the order first seen)."""
    total: dict = {}
    for part in parts:
        for name, per_key in part.items():
            mine = total.setdefault(name, {})
            for key, acc in per_key.items():
                into = mine.setdefault(key, dict.fromkeys(acc, 0.0))
                for metric, value in acc.items():
                    into[metric] += value
    return total


def drift_means(sums: dict) -> dict[str, dict]:
    """{method: {"overall": {metric: mean}, "per_token": {token: {metric: mean}}}} from `drift_sums`."""

    def means(acc):
        n = max(acc.get("positions", 0), 1)
        return {m: acc.get(m, 0.0) / n for m in METRICS} | {"positions": int(acc.get("positions", 0))}

    return {
        name: {
            "overall": means(acc.get("overall", {})),
            "per_token": {tok: means(v) for tok, v in acc.items() if tok != "overall"},
        }
        for name, acc in sums.items()
    }


def drift(
    model,
    new_start: int,
    methods: dict[str, torch.Tensor],
    examples: Sequence[dict],
    token_of_example: Sequence[str],
    target_layer: int = -1,
    batch_size: int = 16,
) -> dict[str, dict]:
    """{method: {"overall": {metric: mean}, "per_token": {token: {metric: mean}}}}.

    Means are over positions (per token: over the positions of that token's snippets).
    """
    return drift_means(drift_sums(model, new_start, methods, examples, token_of_example, target_layer, batch_size))


COMPRESSION_SAMPLE_BYTES = 5_000_000  # tokens-per-byte needs no more text than this


def leading_texts(texts: Iterable, max_bytes: int = COMPRESSION_SAMPLE_BYTES) -> list[str]:
    """The first texts (strings only) holding about `max_bytes` of UTF-8."""
    sample, size = [], 0
    for text in texts:
        if size >= max_bytes:
            break
        if isinstance(text, str):
            sample.append(text)
            size += len(text.encode("utf-8"))
    return sample


def compression(original_tokenizer, expanded_tokenizer, texts: Sequence[str]) -> dict[str, float]:
    """Tokens per byte of held-out text before and after adding the new tokens."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    before = sum(len(ids) for ids in original_tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    after = sum(len(ids) for ids in expanded_tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    return {"bytes": n_bytes, "tokens_before": before, "tokens_after": after,
            "tokens_per_byte_before": before / n_bytes, "tokens_per_byte_after": after / n_bytes}


def relative_to(results: dict[str, dict], baseline: str = "fvt") -> dict[str, dict[str, float]]:
    """Each method's overall metrics divided by the baseline's (lower is better)."""
    base = results[baseline]["overall"]
    return {
        name: {m: r["overall"][m] / base[m] if base[m] else float("nan") for m in METRICS}
        for name, r in results.items()
    }


def markdown_table(results: dict[str, dict], baseline: str = "fvt") -> str:
    ratios = relative_to(results, baseline)
    lines = [
        f"| method | hidden MSE | target-layer MSE | KL | hidden MSE / {baseline} | KL / {baseline} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        o = r["overall"]
        lines.append(
            f"| {name} | {o['hidden_mse']:.4g} | {o['target_mse']:.4g} | {o['kl']:.4g} | "
            f"{ratios[name]['hidden_mse']:.3f} | {ratios[name]['kl']:.3f} |"
        )
    return "\n".join(lines)
