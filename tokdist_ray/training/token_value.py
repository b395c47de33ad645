"""What each new token costs and what it saves, measured on the text the output fit held back.

A new token saves ids: each occurrence stands for its pieces, len(pieces) - 1 fewer. It
costs bits, against the original model reading the same text in its own tokenisation
(every new id replaced by its pieces, vocab/alignment.py), in two ways:

- on its spans: the expanded model's nats on the token and on the id after it, less the
  original's on the pieces and that id. A token predicted worse than its pieces, or whose
  input row leaves the next prediction worse, costs here; one predicted better saves;
- elsewhere: where an old token follows, the expanded model's normaliser holds the new
  tokens' mass, log(1 + sum_k exp(z_k - A)) nats (A: the old log-normaliser, z: the new
  logits), shared among them by their probability there.

Both are read from the tenth of the fit text's chunks that the fit held back, never from
what its rows were fitted on. Not from its held-back snippet windows: an occurrence in one
also sits in the windows of the tokens around it, which the fit did read, so its span
would look far cheaper than on text the fit never saw. How often a token occurs comes
from all of the chunks (TokenValue.with_occurrences puts counts on more text in their
place, which bench/bench_pruning.py compares). A token seen a few times on held-back text
has its span cost shrunk towards the mean over every held-back occurrence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from tokdist_ray.training.output_fit import final_states, old_log_norm, reading_passes
from tokdist_ray.training.output_side import head_logits
from tokdist_ray.vocab.alignment import PieceAligner

POSITION_SLICE = 1024  # positions whose [positions, n_new] logits are held at once


@dataclass
class TokenValue:
    """Sums over every worker's share, [n_new] each."""

    occurrences: torch.Tensor  # in the fit text's chunks
    text_bytes: float  # of those chunks
    held_occurrences: torch.Tensor  # in the held-back chunks
    span_nats: torch.Tensor  # extra nats on those spans (the token and the id after it)
    mass_nats: torch.Tensor  # mass taken where an old token follows, in the held-back chunks
    held_text_bytes: float  # of the held-back chunks

    def bits_per_byte(self) -> torch.Tensor:
        """Each token's estimated cost in bits per byte of text (negative: it saves bits)."""
        seen = float(self.held_occurrences.sum())
        mean_span = float(self.span_nats.sum()) / seen if seen else 0.0
        span = (self.span_nats + mean_span) / (self.held_occurrences + 1)  # one pseudo-occurrence at the mean
        per_byte = self.occurrences / max(self.text_bytes, 1.0)
        return (per_byte * span + self.mass_nats / max(self.held_text_bytes, 1.0)) / math.log(2)

    def ids_saved_per_byte(self, pieces: Sequence[Sequence[int]]) -> torch.Tensor:
        fewer = torch.tensor([len(p) - 1 for p in pieces], dtype=torch.float64)
        return self.occurrences.double() * fewer / max(self.text_bytes, 1.0)

    def with_occurrences(self, counts: Sequence[float]) -> TokenValue:
        """Occurrences in proportion to `counts` (each token's in far more text: the corpus
        continued BPE learned it on), scaled to the fit text's total. It keeps the rare
        tokens the fit text lacks, whose span cost the held-back text cannot tell: at 30,000
        French tokens that lost to counting on the fit text (bench/README.md)."""
        counts = torch.as_tensor(counts, dtype=torch.float64)
        total = float(counts.sum())
        return replace(self, occurrences=counts * float(self.occurrences.sum()) / total) if total else self

    def not_paying(self, pieces: Sequence[Sequence[int]], max_bits_per_saved_id: float) -> list[int]:
        """Indices of the tokens that cost more than `max_bits_per_saved_id` bits for each id
        they save (every token that occurs in no chunk and takes any mass)."""
        cost, saved = self.bits_per_byte().double(), self.ids_saved_per_byte(pieces)
        return (cost > max_bits_per_saved_id * saved).nonzero().squeeze(1).tolist()

    def as_record(self) -> dict:
        return {"occurrences": self.occurrences.tolist(), "text_bytes": self.text_bytes,
                "held_occurrences": self.held_occurrences.tolist(), "span_nats": self.span_nats.tolist(),
                "mass_nats": self.mass_nats.tolist(), "held_text_bytes": self.held_text_bytes}

    @classmethod
    def from_record(cls, record: dict) -> "TokenValue":
        def tensor(name: str) -> torch.Tensor:
            return torch.tensor(record[name], dtype=torch.float64)

        return cls(tensor("occurrences"), record["text_bytes"], tensor("held_occurrences"), tensor("span_nats"),
                   tensor("mass_nats"), record["held_text_bytes"])


def _nats_per_position(model, rows: dict[str, torch.Tensor], new_start: int, seqs: Sequence[list[int]],
                       passes: int, mixed_precision: bool, expanded: bool,
                       mass: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each sequence, (nats on each next id, the new tokens' mass at each position where
    an old id follows): under the expanded model, or with `expanded` False under the
    original (original ids only; no new row is read, the mass is zero). With `mass`, the
    mass is also added into it, token by token."""
    device = rows["input"].device
    out_rows = rows.get("output", rows["input"]).to(device).float()[: len(rows["input"]) if expanded else 0]
    old_rows = model.get_output_embeddings().weight[:new_start]
    result: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(seqs)  # type: ignore[list-item]
    batches = reading_passes(seqs)
    for p in range(max(len(batches), passes)):
        batch = batches[p] if p < len(batches) else []
        ids, mask, states = final_states(model, rows["input"].to(device), new_start, [seqs[i] for i in batch] or [[0]],
                                         mixed_precision)
        for row, i in enumerate(batch):
            n = len(seqs[i]) - 1
            hidden, target = states[row, :n].float(), ids[row, 1 : n + 1]
            nats, mass_here = torch.empty(n, device=device), torch.zeros(n, device=device)
            for lo in range(0, n, POSITION_SLICE):
                h, y = hidden[lo : lo + POSITION_SLICE], target[lo : lo + POSITION_SLICE]
                a, z = old_log_norm(h, old_rows), head_logits(h, out_rows)
                is_new = y >= new_start
                target_logit = (h * old_rows[y.masked_fill(is_new, 0)].float()).sum(-1)
                new_norm = torch.full_like(a, float("-inf"))
                if expanded:
                    new_norm = torch.logsumexp(z, -1)
                    new_logit = z.gather(1, (y - new_start).clamp_min(0)[:, None]).squeeze(1)
                    target_logit = torch.where(is_new, new_logit, target_logit)
                nats[lo : lo + POSITION_SLICE] = torch.logaddexp(a, new_norm) - target_logit
                m = torch.where(is_new, 0.0, F.softplus(new_norm - a))
                mass_here[lo : lo + POSITION_SLICE] = m
                if mass is not None:
                    mass += (m[:, None] * torch.softmax(z, -1)).sum(0).to(mass.dtype)
            result[i] = (nats.cpu(), mass_here.cpu())
    return result


@torch.no_grad()
def measure_token_value(model, rows: dict[str, torch.Tensor], new_start: int, pieces: Sequence[Sequence[int]],
                        chunks: Sequence[list[int]], held: Sequence[bool], text_bytes: float, held_text_bytes: float,
                        mixed_precision: bool = True, rank: int = 0, world: int = 1,
                        all_reduce: Callable[[torch.Tensor], None] = lambda t: None) -> TokenValue:
    """Every worker calls it with its share of the fit text's chunks (expanded ids, each
    after a start token; `held` marks those held back from the fit); the byte counts are
    the whole fit text's. Two forward passes over the held-back share, as it is and in the
    original ids."""
    n, device = len(pieces), rows["input"].device
    occurrences = torch.zeros(n, dtype=torch.float64)
    for seq in chunks:
        new = torch.tensor([t - new_start for t in seq if t >= new_start], dtype=torch.long)
        occurrences += torch.bincount(new, minlength=n).double()
    aligner = PieceAligner(pieces, new_start)
    held_seqs = [list(s) for s, h in zip(chunks, held) if h]
    aligned = [aligner.align(s) for s in held_seqs]
    teacher_seqs = [a.teacher_ids for a in aligned]
    passes = torch.zeros(world, 2, device=device)  # every worker runs the most passes any needs (ZeRO-3)
    passes[rank] = torch.tensor([len(reading_passes(held_seqs)), len(reading_passes(teacher_seqs))], device=device)
    all_reduce(passes)
    most = passes.max(0).values.long().tolist()
    mass = torch.zeros(n, dtype=torch.float64, device=device)
    expanded = _nats_per_position(model, rows, new_start, held_seqs, most[0], mixed_precision, True, mass)
    original = _nats_per_position(model, rows, new_start, teacher_seqs, most[1], mixed_precision, False)
    held_occurrences, span = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for seq, a, (nats, mass_here), (teacher_nats, _) in zip(held_seqs, aligned, expanded, original):
        ends = torch.tensor(a.teacher_positions)  # teacher index of each id's last piece
        before = torch.cat([torch.zeros(1), teacher_nats.double().cumsum(0)])
        extra = nats.double() - (before[ends[1:]] - before[ends[:-1]])  # [len - 1]: each next id against its pieces
        ids = torch.tensor(seq)
        is_new = ids[1:] >= new_start
        token = (ids[1:] - new_start).clamp_min(0)
        held_occurrences.index_add_(0, token[is_new], torch.ones(int(is_new.sum()), dtype=torch.float64))
        span.index_add_(0, token[is_new], extra[is_new])
        after_new = ~is_new & (ids[:-1] >= new_start)  # an old id right after a new one: its drift is that token's
        span.index_add_(0, (ids[:-1] - new_start)[after_new], (extra - mass_here.double())[after_new])
    totals = [occurrences, held_occurrences, span, mass.cpu()]
    for total in totals:
        summed = total.to(device)
        all_reduce(summed)
        total.copy_(summed.cpu())
    return TokenValue(totals[0], text_bytes, totals[1], totals[2], totals[3], held_text_bytes)
