"""From snippets to padded training batches.

Sequences are right-padded and no attention mask is passed to the model: under causal
attention no real position can see a pad to its right, so the mask would change nothing
but would keep SDPA off its fast causal path. Pads are excluded from the loss instead.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tokdist_ray.vocab.alignment import PieceAligner


def align_snippets(aligner: PieceAligner, snippets: Sequence[Sequence[int]]) -> list[dict]:
    """One training example per snippet (expanded ids): student ids, teacher ids, alignment."""
    examples = []
    for ids in snippets:
        aligned = aligner.align(ids)
        examples.append(
            {
                "teacher_ids": aligned.teacher_ids,
                "student_ids": aligned.student_ids,
                "teacher_index": aligned.teacher_positions,
            }
        )
    return examples


def _pad(rows: Sequence[Sequence[int]], value: int = 0) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def collate(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Pad a list of examples into the tensors TokenDistiller.forward takes.

    Pad id 0 is safe: padded positions are masked out of every loss and, being to the
    right of all real tokens, invisible to them under causal attention.
    """
    student = [e["student_ids"] for e in examples]
    return {
        "teacher_ids": _pad([e["teacher_ids"] for e in examples]),
        "student_ids": _pad(student),
        "teacher_index": _pad([e["teacher_index"] for e in examples]),
        "student_mask": _pad([[1] * len(s) for s in student]).bool(),
    }
