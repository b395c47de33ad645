"""Merge new phrases in a snippet and line merged positions up with original ones.

The student sees the snippet with every occurrence of every new phrase replaced by its
new id; the teacher sees the original ids. Student position j is compared with teacher
position `teacher_positions[j]`: the last subtoken of a merged phrase (the first place
where the teacher has seen the whole phrase), or the same token when it was not merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

_END = -1  # trie key marking "a phrase ends here"; token ids are never negative


@dataclass(frozen=True)
class MergedSnippet:
    student_ids: list[int]
    teacher_positions: list[int]


class PhraseMerger:
    """Greedy left-to-right, longest-match-first merging over a trie of token ids.

    Lookup cost per position is one dict probe unless a phrase starts there, so merging
    stays linear in the snippet length whatever the number of phrases.
    """

    def __init__(self, phrases: Sequence[Sequence[int]], new_ids: Sequence[int]):
        if len(phrases) != len(new_ids):
            raise ValueError("phrases and new_ids must have the same length")
        self._trie: dict = {}
        for phrase, new_id in zip(phrases, new_ids):
            if len(phrase) < 2:
                raise ValueError(f"a new phrase needs at least two original ids, got {list(phrase)}")
            node = self._trie
            for token_id in phrase:
                node = node.setdefault(int(token_id), {})
            node[_END] = int(new_id)

    @classmethod
    def for_tokens(cls, tokens, first_id: int = 0) -> "PhraseMerger":
        """A merger of each NewToken's phrase into ids first_id, first_id + 1, ... in order."""
        return cls([t.phrase_ids for t in tokens], range(first_id, first_id + len(tokens)))

    def longest_match(self, ids: Sequence[int], start: int) -> tuple[int, int] | None:
        """(new_id, length) of the longest phrase starting at `start`, or None."""
        node, best = self._trie, None
        for offset in range(start, len(ids)):
            node = node.get(ids[offset])
            if node is None:
                break
            if _END in node:
                best = (node[_END], offset - start + 1)
        return best

    def occurrences(self, ids: Sequence[int]) -> list[tuple[int, int, int]]:
        """(start, length, new_id) of every phrase the merge would replace."""
        found, i, n, trie = [], 0, len(ids), self._trie
        while i < n:
            match = self.longest_match(ids, i) if ids[i] in trie else None
            if match is None:
                i += 1
            else:
                found.append((i, match[1], match[0]))
                i += match[1]
        return found

    def merge(self, ids: Sequence[int]) -> MergedSnippet:
        student, positions, i = [], [], 0
        for start, length, new_id in self.occurrences(ids):
            student.extend(ids[i:start])
            positions.extend(range(i, start))
            student.append(new_id)
            positions.append(start + length - 1)
            i = start + length
        student.extend(ids[i:])
        positions.extend(range(i, len(ids)))
        return MergedSnippet(list(student), positions)
