"""Phrase merging and the student->teacher position alignment."""

import random

import pytest

from tokdist_ray.vocab.alignment import PhraseMerger


def test_unmerged_tokens_align_to_themselves_and_phrases_to_their_last_subtoken():
    merger = PhraseMerger([[5, 6, 7]], [100])
    merged = merger.merge([1, 5, 6, 7, 2])
    assert merged.student_ids == [1, 100, 2]
    assert merged.teacher_positions == [0, 3, 4]


def test_longest_match_wins_over_a_prefix_phrase():
    merger = PhraseMerger([[1, 2], [1, 2, 3]], [100, 101])
    assert merger.merge([1, 2, 3, 4]).student_ids == [101, 4]
    assert merger.merge([1, 2, 4]).student_ids == [100, 4]


def test_overlapping_phrases_merge_left_to_right():
    merger = PhraseMerger([[1, 2], [2, 3]], [100, 101])
    merged = merger.merge([1, 2, 3])
    assert merged.student_ids == [100, 3]
    assert merged.teacher_positions == [1, 2]
    assert merger.merge([9, 2, 3]).student_ids == [9, 101]


def test_adjacent_and_repeated_occurrences_all_merge():
    merger = PhraseMerger([[1, 2], [3, 4]], [100, 101])
    merged = merger.merge([1, 2, 1, 2, 3, 4, 1])
    assert merged.student_ids == [100, 100, 101, 1]
    assert merged.teacher_positions == [1, 3, 5, 6]
    assert merger.occurrences([1, 2, 1, 2, 3, 4, 1]) == [(0, 2, 100), (2, 2, 100), (4, 2, 101)]


def test_phrase_at_the_very_end_and_partial_phrase_at_the_end():
    merger = PhraseMerger([[7, 8, 9]], [100])
    assert merger.merge([1, 7, 8, 9]).teacher_positions == [0, 3]
    assert merger.merge([1, 7, 8]).student_ids == [1, 7, 8]


def test_thousands_of_phrases_match_a_brute_force_merge():
    rng = random.Random(0)
    phrases = sorted({tuple(rng.randrange(50) for _ in range(rng.randint(2, 4))) for _ in range(3000)})
    new_ids = list(range(1000, 1000 + len(phrases)))
    merger = PhraseMerger(phrases, new_ids)
    lookup = dict(zip(phrases, new_ids))

    def brute(ids):
        out, i = [], 0
        while i < len(ids):
            for length in (4, 3, 2):
                if tuple(ids[i : i + length]) in lookup:
                    out.append(lookup[tuple(ids[i : i + length])])
                    i += length
                    break
            else:
                out.append(ids[i])
                i += 1
        return out

    for _ in range(200):
        ids = [rng.randrange(50) for _ in range(60)]
        assert merger.merge(ids).student_ids == brute(ids)


def test_single_id_phrases_are_rejected():
    with pytest.raises(ValueError, match="at least two"):
        PhraseMerger([[5]], [100])
