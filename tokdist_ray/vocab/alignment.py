"""Line a snippet's expanded ids up with the original ids the teacher reads.

A snippet holds the ids the *expanded* tokenizer gives its text (the student's input,
exactly what the model will see at inference). The teacher reads every new id replaced
by its pieces, the original ids it stands for. For a tokenizer built on merges this is
the original tokenizer's own encoding of the text: every new merge ranks after every
original one, so the expanded tokenisation is the original one with new merges applied
on top, and each new token covers whole original tokens, its pieces.

Student position j is compared with teacher position `teacher_positions[j]`: the last
piece of a new token (the first place where the teacher has seen all of it), or the same
token when it is an original one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class AlignedSnippet:
    student_ids: list[int]
    teacher_ids: list[int]
    teacher_positions: list[int]


class PieceAligner:
    """Expands new ids (new_start, new_start + 1, ...) into their pieces."""

    def __init__(self, pieces: Sequence[Sequence[int]], new_start: int):
        for i, piece_ids in enumerate(pieces):
            if not piece_ids or any(p >= new_start for p in piece_ids):
                raise ValueError(f"new id {new_start + i} needs pieces among the original ids, got {list(piece_ids)}")
        self.new_start = new_start
        self._pieces = [list(map(int, p)) for p in pieces]

    @classmethod
    def for_tokens(cls, tokens, new_start: int) -> "PieceAligner":
        """For NewTokens with ids new_start, new_start + 1, ... in order."""
        return cls([t.phrase_ids for t in tokens], new_start)

    def align(self, student_ids: Sequence[int]) -> AlignedSnippet:
        teacher, positions = [], []
        for token_id in map(int, student_ids):
            if token_id >= self.new_start:
                teacher.extend(self._pieces[token_id - self.new_start])
            else:
                teacher.append(token_id)
            positions.append(len(teacher) - 1)
        return AlignedSnippet(list(map(int, student_ids)), teacher, positions)
