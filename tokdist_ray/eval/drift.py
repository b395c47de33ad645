"""Held-out drift: how far the expanded model strays from the original on text it never
trained on, for Token Distillation's rows and for the cheap baselines, in one pass.

For each held-out snippet the original model reads the original ids (the teacher) and the
expanded model reads the merged ids (the student). From the first new token on, at the
aligned positions, we measure last-layer and target-layer hidden-state MSE and the KL
divergence of next-token distributions over the original vocabulary. Positions before
the first new token are identical by construction and would only dilute the averages.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from tokdist_ray.config import BASELINES
from tokdist_ray.console import StageProgress
from tokdist_ray.data.mining.local_mining import mine_snippets
from tokdist_ray.errors import TooFewSnippetsError
from tokdist_ray.eval import shards
from tokdist_ray.eval.metrics import Evaluation, Metric, Part
from tokdist_ray.eval.plots import pyplot, save
from tokdist_ray.training.batching import align_snippets, collate
from tokdist_ray.training.rows import pre_init_rows
from tokdist_ray.training.step import NewRows, TokenDistiller
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.models import ties_word_embeddings
from tokdist_ray.vocab.tokens import NewToken

log = logging.getLogger("tokdist_ray")

MEASURES = ("hidden_mse", "target_mse", "kl")  # per position, summed, averaged


def baseline_rows(model, tokens: Sequence[NewToken], new_start: int, side: str = "input",
                  names: Sequence[str] = BASELINES) -> dict[str, torch.Tensor]:
    """The rows of the heuristics Token Distillation is compared with (`names`, of
    config.BASELINES), from the input table, or from an untied model's output table
    (`side="output"`; {} for tied models)."""
    if side == "output" and ties_word_embeddings(model):
        return {}
    table = (model.get_input_embeddings() if side == "input" else model.get_output_embeddings()).weight[:new_start]
    phrases = [t.phrase_ids for t in tokens]
    rows = {
        "fvt": lambda: pre_init_rows(table, phrases, "fvt", side),
        "adapti-vocab": lambda: pre_init_rows(table, phrases, "adapti-vocab", side),
        # the row resize_token_embeddings centres new rows on: the mean of all rows
        "mean_embedding": lambda: table.float().mean(0).expand(len(phrases), -1).clone(),
    }
    return {name: rows[name]() for name in names}


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
        return {m: acc.get(m, 0.0) / n for m in MEASURES} | {"positions": int(acc.get("positions", 0))}

    return {
        name: {
            "overall": means(acc.get("overall", {})),
            "per_token": {tok: means(v) for tok, v in acc.items() if tok != "overall"},
        }
        for name, acc in sums.items()
    }


def drift(model, *args, **options) -> dict[str, dict]:
    """{method: {"overall": {metric: mean}, "per_token": {token: {metric: mean}}}}, from
    drift_sums' arguments. Means are over positions (per token: over the positions of that
    token's snippets)."""
    return drift_means(drift_sums(model, *args, **options))


def relative_to(results: dict[str, dict], baseline: str = "fvt") -> dict[str, dict[str, float]]:
    """Each method's overall metrics divided by the baseline's (lower is better)."""
    base = results[baseline]["overall"]
    return {
        name: {m: r["overall"][m] / base[m] if base[m] else float("nan") for m in MEASURES}
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


def heldout_snippets(evaluation: Evaluation, texts: list[str], log_sample: bool) -> list[dict]:
    """Every held-out snippet drift reads (a seeded sample with eval.max_snippets): the
    same list in every worker."""
    settings = evaluation.settings
    snippets, _ = mine_snippets(texts, evaluation.expansion, evaluation.snippet_len, settings.snippets_per_token)
    if not snippets:
        raise TooFewSnippetsError("none of the new tokens occurs in eval.heldout_paths; point it at held-out text that uses them")
    if settings.max_snippets and len(snippets) > settings.max_snippets:
        keep = sorted(random.Random(evaluation.seed).sample(range(len(snippets)), settings.max_snippets))
        if log_sample:
            log.info("drift: a sample of %d of the %d held-out snippets (eval.max_snippets)", len(keep), len(snippets))
        snippets = [snippets[i] for i in keep]
    return snippets


PLOT_TOKENS = 40  # per-token drift: at most this many tokens


def plot_per_token(results: dict, out_dir: Path) -> str:
    """Last-layer hidden-state drift per new token, a bar per method."""
    names = list(results)
    per_token = results[names[0]]["per_token"]
    # the tokens with the most held-out positions: a bar per token of thousands is no plot
    tokens = sorted(sorted(per_token, key=lambda t: (-per_token[t]["positions"], t))[:PLOT_TOKENS])
    fig, ax = pyplot().subplots(figsize=(max(6, 0.6 * len(tokens) * len(names) / 2), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results[name]["per_token"][t]["hidden_mse"] for t in tokens]
        ax.bar([x + i * width for x in range(len(tokens))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tokens))], [repr(t) for t in tokens], rotation=60, ha="right")
    ax.set_ylabel("held-out last-layer hidden MSE")
    ax.set_title("Drift from the original model per new token (lower is better)"
                 + (f", the {PLOT_TOKENS} most frequent" if len(per_token) > PLOT_TOKENS else ""))
    ax.legend()
    return save(fig, out_dir / "drift_per_token.png")


class Drift(Metric):
    """Each worker sums drift over its run of whole batches of the held-out snippets (every
    worker mines the same ones); the sums add up to the undivided run's."""

    name = "drift"
    page = 1  # its table closes eval.md, and so the log of it: drift is what Token Distillation minimises

    def score(self, part: Part) -> dict:
        evaluation, settings = part.evaluation, part.evaluation.settings
        tokens, new_start = evaluation.expansion.tokens, evaluation.expansion.new_start
        snippets = heldout_snippets(evaluation, part.texts, log_sample=part.index == 0)
        lo, hi = shards.part(len(snippets), part.index, part.count, settings.batch_size)
        examples = align_snippets(PieceAligner.for_tokens(tokens, new_start), [s["input_ids"] for s in snippets[lo:hi]])
        log.info("drift: %d held-out snippets%s, %d methods", len(examples),
                 f" of {len(snippets)}{part.label}" if part.count > 1 else "", len(part.methods))
        return {"heldout_snippets": len(examples),
                "drift": drift_sums(part.model, new_start, part.methods, examples, [s["token"] for s in snippets[lo:hi]],
                                    evaluation.target_layer, settings.batch_size, part.label)}

    def merge(self, parts: list[dict], new_start: int) -> dict:
        results = drift_means(add_sums(p["drift"] for p in parts))
        return {"heldout_snippets": sum(p["heldout_snippets"] for p in parts), "methods": results,
                "relative_to_fvt": relative_to(results)}

    def work(self, part: dict) -> dict:
        return {"heldout_snippets": part["heldout_snippets"]}

    def sections(self, report: dict) -> list[str]:
        return ["## Drift from the original at aligned positions (lower is better)\n\n" + markdown_table(report["methods"])]

    def plots(self, report: dict, out_dir: Path) -> list[str]:
        return [plot_per_token(report["methods"], out_dir)]

    def summary(self, report: dict) -> dict:
        return {"relative_to_fvt": report["relative_to_fvt"]["token_distillation"]}
