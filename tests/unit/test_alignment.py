"""The student->teacher alignment: new ids expanded into their pieces."""

import pytest
from transformers import AutoTokenizer

from tests.helpers import SENTENCES, WORDS
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.merges import expand_with_merges


def test_new_ids_expand_to_their_pieces_and_align_to_the_last_one():
    aligner = PieceAligner([[5, 6, 7], [8, 9]], new_start=100)
    aligned = aligner.align([1, 100, 2, 101, 101])
    assert aligned.student_ids == [1, 100, 2, 101, 101]
    assert aligned.teacher_ids == [1, 5, 6, 7, 2, 8, 9, 8, 9]
    assert aligned.teacher_positions == [0, 3, 4, 6, 8]


def test_snippets_without_new_ids_are_their_own_teacher():
    aligned = PieceAligner([[5, 6]], new_start=100).align([3, 4, 5, 6])
    assert aligned.teacher_ids == aligned.student_ids == [3, 4, 5, 6]
    assert aligned.teacher_positions == [0, 1, 2, 3]


@pytest.mark.parametrize("pieces", [[[]], [[5, 100]]])
def test_pieces_must_be_original_ids(pieces):
    with pytest.raises(ValueError, match="pieces among the original ids"):
        PieceAligner(pieces, new_start=100)


def test_teacher_ids_are_the_original_tokenizers_encoding(tiny_tokenizer_dir):
    """With merges, the expanded encoding of any text, new ids expanded, is the original
    encoding of that text: what the teacher reads is what the original model reads."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    expansion = expand_with_merges(tokenizer, WORDS)
    aligner = PieceAligner.for_tokens(expansion.tokens, expansion.new_start)
    for text in SENTENCES + [s.replace("Krankenwagen", "Krankenwagens") for s in SENTENCES]:
        student = expansion.tokenizer(text)["input_ids"]
        assert aligner.align(student).teacher_ids == tokenizer(text)["input_ids"]
    assert any(i >= expansion.new_start for i in expansion.tokenizer(SENTENCES[0])["input_ids"])


def test_windows_are_trimmed_until_their_text_encodes_back_to_them(tiny_tokenizer_dir):
    """A window cut inside a whitespace run (or a UTF-8 character) is a slice of the
    document's ids, but its own text encodes otherwise: settle trims that edge."""
    from tokdist_ray.data.snippets import settle, window_around

    backend = AutoTokenizer.from_pretrained(tiny_tokenizer_dir()).backend_tokenizer
    ids = backend.encode("The river.\n\n\n   Then the garden é and more", add_special_tokens=False).ids
    for start in range(len(ids)):
        for length in (3, 6, 9):
            window, offset = window_around(ids, start, 1, length)
            settled = settle(backend, window, offset)
            if settled is not None:
                trimmed, at = settled
                assert backend.encode(backend.decode(trimmed), add_special_tokens=False).ids == trimmed
                assert trimmed[at] == ids[start] and trimmed == window[offset - at : offset - at + len(trimmed)]
    broken = backend.encode("garden é", add_special_tokens=False).ids[:-1]  # a partial character at the end
    assert settle(backend, broken, 0) is not None and settle(backend, broken, len(broken) - 1) is None
