"""The new tokens' output rows fitted to corpus text, after distillation.

Distillation makes a new token's input row act like its pieces. Its output row decides how
much probability the expanded model gives the token, at every position. The old rows stay
frozen, so the old piece sequence keeps its probability: a new token's logit has to be
high where it follows and low where its first piece is likely but something else follows.
Rows set from the pieces cannot know that: the first piece's row predicts a new token
where it follows, yet leaks mass onto it everywhere else the piece is likely.

The fit maximises the expanded model's likelihood of corpus text in its own tokenisation
over the new output rows alone. Every hidden state and old logit is then fixed, and the
loss is convex in the rows. So the states are computed once, in one pass over the text,
and the fit takes many cheap steps over them. At a position with state h, old log-normaliser
A and new logits z = W h, the loss is

    logaddexp(A, logsumexp(z)) - z_y       before a new token y,
    softplus(logsumexp(z) - A)             before an old token (its old logit is constant).

With tens of thousands of new rows a step's logsumexp(z) is estimated: it computes the
rows its positions' next tokens are and a uniform draw of the others, which stand for all
of them (sample_rows); the held-back checks use every row.

A tenth of the fit text's chunks is held back; the fit keeps the rows that scored best on
them, and stops once they stop improving. The mined windows are all fitted on, none held
back: a window holds its token wherever the text does not, and past some point the rows
go on fitting the windows while text as it comes gets worse (bench/README.md, "Where the
output fit stops"). Only a fit text too short for a held-back chunk holds back windows.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from tokdist_ray.config import OutputFitConfig
from tokdist_ray.console import StageProgress
from tokdist_ray.training.output_side import VOCAB_SLICE, head_logits
from tokdist_ray.training.step import autocast_context, embed_with_new_rows
from tokdist_ray.vocab.special import start_token

log = logging.getLogger("tokdist_ray")

POSITIONS_PER_PASS = 4096  # ids per forward pass (eight 2,000-byte chunks, or a hundred snippets)
HELD_BACK_EVERY = 10  # every 10th chunk is held back
CHECK_EVERY = 25  # steps between checks on the held-back chunks
PATIENCE = 6  # checks without improvement before the fit stops
NOT_FITTED = {"skipped": "not asked for, or no corpus text"}  # report.json's output_fit then


@dataclass
class FitPositions:
    """One worker's positions of the fit text: [N] rows each."""

    hidden: torch.Tensor  # [N, d] final states, fp32
    old_log_norm: torch.Tensor  # [N] logsumexp of the old logits
    new_target: torch.Tensor  # [N] the next id minus new_start, -1 before an old token
    held_back: torch.Tensor  # [N] bool: from a held-back chunk
    weight: torch.Tensor  # [N] the position's weight in the loss: 1 in the fit text, settings.window_weight in a window

    @staticmethod
    def joined(parts: Sequence[FitPositions]) -> FitPositions:
        return FitPositions(*(torch.cat(column) for column in zip(*(vars(p).values() for p in parts))))


def fit_chunk_ids(tokenizer, chunks: Sequence[str], start: int, max_len: int | None) -> list[list[int]]:
    """Each chunk in the expanded tokenisation after a start token, cut at `max_len` ids."""
    ids = tokenizer(list(chunks), add_special_tokens=False)["input_ids"] if chunks else []  # a worker's share may be none
    return [[start, *x][:max_len] for x in ids]


def old_log_norm(hidden: torch.Tensor, old_rows: torch.Tensor) -> torch.Tensor:
    """logsumexp over the old vocabulary, in slices of it (a 128k vocabulary's fp32 logits
    for a pass of chunks are gigabytes)."""
    out = torch.full(hidden.shape[:1], float("-inf"), device=hidden.device)
    for lo in range(0, len(old_rows), VOCAB_SLICE):
        out = torch.logaddexp(out, torch.logsumexp(head_logits(hidden, old_rows[lo : lo + VOCAB_SLICE]), -1))
    return out


def reading_passes(chunk_ids: Sequence[list[int]]) -> list[list[int]]:
    """The chunks' indices in forward passes of at most POSITIONS_PER_PASS ids (padding
    included; a longer chunk alone), similar lengths together: little padding."""
    passes: list[list[int]] = []
    for i in sorted(range(len(chunk_ids)), key=lambda i: len(chunk_ids[i])):
        if passes and (len(passes[-1]) + 1) * len(chunk_ids[i]) <= POSITIONS_PER_PASS:
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


def final_states(model, input_rows: torch.Tensor, new_start: int, seqs: Sequence[list[int]],
                 mixed_precision: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, final states) of one forward pass over `seqs` right-padded to one width,
    the new ids (>= new_start) embedded from `input_rows`."""
    device = input_rows.device
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    ids, mask = ids.to(device), mask.to(device)
    with autocast_context(device, mixed_precision):
        embeds = embed_with_new_rows(model.get_input_embeddings(), input_rows, ids, new_start)
        states = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False).last_hidden_state
    return ids, mask, states


@torch.no_grad()
def collect_positions(model, input_rows: torch.Tensor, new_start: int, chunk_ids: Sequence[list[int]],
                      held_back: Sequence[bool], passes: int | None = None, mixed_precision: bool = True,
                      progress: bool = True, weights: Sequence[float] | None = None) -> FitPositions:
    """Final states and old log-normalisers at every position of the chunks (one worker's
    share; `held_back`: whether each chunk is), with the new tokens embedded from
    `input_rows`; `weights`: each chunk's positions' weight (1 unless given).
    `passes` forward passes are run whatever the share's size (ZeRO-3 workers must run the
    same number: at least `reading_passes`'); passes without chunks run a one-id input."""
    device = input_rows.device
    old_rows = model.get_output_embeddings().weight[:new_start]
    parts: list[FitPositions] = []
    shown = StageProgress("output fit, reading the text", len(chunk_ids), "chunks") if progress else None
    batches = reading_passes(chunk_ids)
    for p in range(max(len(batches), passes or 0)):
        batch = batches[p] if p < len(batches) else []
        ids, mask, states = final_states(model, input_rows, new_start, [chunk_ids[i] for i in batch] or [[0]],
                                         mixed_precision)
        if not batch:
            continue
        keep = mask[:, :-1] & mask[:, 1:]
        hidden = states[:, :-1][keep].float()
        targets = ids[:, 1:][keep]
        held = torch.tensor([held_back[i] for i in batch], device=device)[:, None].expand_as(keep)[keep]
        weight = torch.tensor([1.0 if weights is None else weights[i] for i in batch], device=device)
        parts.append(FitPositions(hidden, old_log_norm(hidden, old_rows),
                                  torch.where(targets >= new_start, targets - new_start, -1), held,
                                  weight[:, None].expand_as(keep)[keep]))
        if shown is not None:
            shown.advance(len(batch))
    if not parts:
        d = input_rows.shape[1]
        return FitPositions(input_rows.new_zeros(0, d), input_rows.new_zeros(0), torch.zeros(0, dtype=torch.long, device=device),
                            torch.zeros(0, dtype=torch.bool, device=device), input_rows.new_zeros(0))
    return FitPositions.joined(parts)


@dataclass
class RowSample:
    """The new rows a step computes logits for, when not every one: those its positions'
    next tokens are, and a uniform draw of the rest, each drawn row counting for
    weight = (rest / drawn) rows in the normaliser (an unbiased estimate of its sum)."""

    index: torch.Tensor  # [S] rows, the positions' own first
    log_weight: torch.Tensor  # [S] 0 for a positions' own row, log(weight) for a drawn one
    column: torch.Tensor  # [n_new] each row's place in index (-1: not computed)


def sample_rows(n_new: int, targets: torch.Tensor, affordable: int, generator: torch.Generator) -> RowSample | None:
    """The rows a step over positions with these `targets` (-1 before an old token) computes
    when it can afford `affordable` of the `n_new` (None: it affords all). At least half of
    them are drawn, however many next tokens the positions hold."""
    if affordable >= n_new:
        return None
    own = torch.unique(targets[targets >= 0]).cpu()
    rest = torch.ones(n_new, dtype=torch.bool)
    rest[own] = False
    rest = rest.nonzero().squeeze(1)
    drawn = rest[torch.randperm(len(rest), generator=generator)[: max(affordable - len(own), affordable // 2)]]
    index = torch.cat([own, drawn]).to(targets.device)
    weight = len(rest) / len(drawn) if len(drawn) else 1.0  # nothing to draw: the positions hold every row
    log_weight = torch.cat([torch.zeros(len(own)), torch.full((len(drawn),), math.log(weight))])
    column = torch.full((n_new,), -1, dtype=torch.long, device=targets.device)
    column[index] = torch.arange(len(index), device=targets.device)
    return RowSample(index, log_weight.to(targets.device), column)


def position_losses(rows: torch.Tensor, at: FitPositions, index: torch.Tensor,
                    sample: RowSample | None = None) -> torch.Tensor:
    """[len(index)] the loss at those positions (see the module docstring), from fp32 logits
    over every new row, or over `sample`'s (holding each position's next token) with the
    rest of the normaliser estimated from its draw."""
    hidden, old, target = at.hidden[index], at.old_log_norm[index], at.new_target[index]
    if sample is None:
        logits = head_logits(hidden, rows)
        new_norm, target_column = torch.logsumexp(logits, -1), target.clamp_min(0)
    else:
        logits = head_logits(hidden, rows[sample.index])
        new_norm, target_column = torch.logsumexp(logits + sample.log_weight, -1), sample.column[target.clamp_min(0)]
    is_new = target >= 0
    target_logit = logits.gather(1, target_column.clamp_min(0)[:, None]).squeeze(1)
    return torch.where(is_new, torch.logaddexp(old, new_norm) - target_logit, F.softplus(new_norm - old))


def step_rows(settings: OutputFitConfig, n_new: int) -> int:
    """New rows whose logits a step computes: every one, or as many as keep its logits over
    batch_positions positions within max_step_logits (a step's cost grows with both)."""
    return max(1, min(n_new, settings.max_step_logits // settings.batch_positions))


@dataclass
class FitResult:
    rows: torch.Tensor  # [n_new, d] fp32
    summary: dict  # for report.json


def fit_output_rows(initial: torch.Tensor, at: FitPositions, settings: OutputFitConfig, seed: int, rank: int = 0,
                    world: int = 1, all_reduce: Callable[[torch.Tensor], None] = lambda t: None,
                    on_check: Callable[[int, float, torch.Tensor], None] | None = None) -> FitResult:
    """Adam on the new output rows over the positions, their gradient summed over workers
    (each holds its own positions; every worker ends with the same rows). `on_check(step,
    held-back loss, rows)` is called at each check (bench/bench_fit_stopping.py traces the fit)."""
    rows = initial.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([rows], lr=settings.learning_rate)
    train = (~at.held_back).nonzero().squeeze(1)
    held = at.held_back.nonzero().squeeze(1)
    generator = torch.Generator(device="cpu").manual_seed(seed + rank)
    per_worker = max(1, settings.batch_positions // world)
    rows_per_step = step_rows(settings, len(initial))
    counts = torch.tensor([float(len(train)), float(len(held)), float((at.new_target >= 0).sum()),
                           float(at.weight[held].sum())], device=rows.device)
    all_reduce(counts)
    if counts[0] == 0 or counts[1] == 0:
        return FitResult(initial.detach().float().clone(), {"skipped": "too little corpus text to fit on"})

    def weighted_loss(index: torch.Tensor, sample: RowSample | None = None) -> torch.Tensor:
        return (position_losses(rows, at, index, sample) * at.weight[index]).sum()

    def held_back_loss() -> float:
        with torch.no_grad():
            total = torch.stack([weighted_loss(part) for part in held.split(per_worker)]).sum() \
                if len(held) else rows.new_zeros(())
        all_reduce(total)
        return float(total) / float(counts[3])

    rows.grad = torch.zeros_like(rows)
    start = best = held_back_loss()
    best_rows, since_best, step = rows.detach().clone(), 0, 0
    for step in range(1, settings.max_steps + 1):
        pick = train[torch.randint(len(train), (per_worker,), generator=generator).to(train.device)] if len(train) \
            else train
        if len(pick):
            sample = sample_rows(len(initial), at.new_target[pick], rows_per_step, generator)
            (weighted_loss(pick, sample) / (per_worker * world)).backward()
        # every worker joins, with or without positions of its own. Dense, unlike DDP's exchange
        # (sparse_exchange.py): each position's normaliser gives every row it computes a gradient
        all_reduce(rows.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if step % CHECK_EVERY:
            continue
        current = held_back_loss()
        if on_check is not None:
            on_check(step, current, rows.detach())
        if current < best - 1e-6:  # a diverged (nan) check never counts as the best
            best, best_rows, since_best = current, rows.detach().clone(), 0
        else:
            since_best += 1
        if rank == 0 and step % (4 * CHECK_EVERY) == 0:
            log.info("output fit: step %d, held-back loss %.4f nats per position (from %.4f)", step, current, start)
        if since_best >= PATIENCE:
            break
    summary = {"positions": int(counts[0] + counts[1]), "before_new_tokens": int(counts[2]),
               "positions_per_step": per_worker * world, "rows_per_step": rows_per_step, "steps": step,
               "held_back_loss_start": round(start, 6), "held_back_loss_best": round(best, 6),
               "stopped_early": step < settings.max_steps}
    return FitResult(best_rows, summary)


@dataclass
class FitSequences:
    """One worker's share of what the fit reads: expanded ids, each after a start token."""

    ids: list[list[int]]  # its chunks of the fit text, then its windows
    numbers: list[int]  # each one's index in the whole fit text, the windows after every chunk
    n_texts: int  # chunks in the whole fit text
    text_bytes: list[int]  # bytes of each chunk of the whole fit text

    @property
    def held_back(self) -> list[bool]:
        """Every tenth chunk of the fit text; windows only if it has no tenth chunk (module docstring)."""
        windows_held = self.n_texts < HELD_BACK_EVERY
        return [n % HELD_BACK_EVERY == HELD_BACK_EVERY - 1 and (n < self.n_texts or windows_held) for n in self.numbers]

    @property
    def chunks(self) -> list[list[int]]:
        return [ids for ids, n in zip(self.ids, self.numbers) if n < self.n_texts]  # they come first

    @property
    def held_back_text_bytes(self) -> int:
        return sum(b for i, b in enumerate(self.text_bytes) if i % HELD_BACK_EVERY == HELD_BACK_EVERY - 1)


def fit_sequences(model, tokenizer, texts: Sequence[str], windows: Sequence[list[int]], rank: int = 0,
                  world: int = 1) -> FitSequences:
    """Worker `rank`'s share: every world-th chunk and window."""
    numbers = list(range(rank, len(texts), world))
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    ids = fit_chunk_ids(tokenizer, [texts[i] for i in numbers], start_token(tokenizer), limit)
    window_numbers = list(range(rank, len(windows), world))
    ids += [list(windows[i]) for i in window_numbers]
    numbers += [len(texts) + i for i in window_numbers]
    return FitSequences(ids, numbers, len(texts), [len(t.encode("utf-8")) for t in texts])


def fit_on_text(model, rows: dict[str, torch.Tensor], new_start: int, tokenizer, texts: Sequence[str],
                settings: OutputFitConfig, seed: int, mixed_precision: bool = True, rank: int = 0, world: int = 1,
                all_reduce: Callable[[torch.Tensor], None] = lambda t: None,
                windows: Sequence[list[int]] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """`rows` ("input", and "output" for untied rows) with "output" fitted on `texts` (the
    fit text, whole) and `windows` (expanded ids of more corpus text: the mined snippets,
    whole), and the fit's summary. Each of `world` workers reads every world-th chunk and
    window. The model's own weights are only read."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    share = fit_sequences(model, tokenizer, texts, windows, rank, world)
    passes = torch.zeros(world, device=device)
    passes[rank] = len(reading_passes(share.ids))
    all_reduce(passes)
    weights = [1.0 if n < share.n_texts else settings.window_weight for n in share.numbers]
    at = collect_positions(model, rows["input"].to(device), new_start, share.ids, share.held_back, int(passes.max()),
                           mixed_precision, progress=rank == 0, weights=weights)
    initial = rows.get("output", rows["input"]).to(device)
    result = fit_output_rows(initial, at, settings, seed, rank, world, all_reduce)
    if "skipped" in result.summary:
        if rank == 0:
            log.warning("output fit skipped: %s", result.summary["skipped"])
        return rows, result.summary
    summary = {"chunks": len(texts), "text_bytes": sum(share.text_bytes), "snippet_windows": len(windows),
               **result.summary, "seconds": round(time.perf_counter() - started, 3), "settings": dict(vars(settings))}
    if rank == 0:
        log.info("output fit: %s", summary)
    return {**rows, "output": result.rows.cpu()}, summary
