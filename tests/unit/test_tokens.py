"""New-token selection: normalisation, phrase tokenisation, every filter reason."""

import json
import re

import pytest
from transformers import AutoTokenizer

from tokdist_ray.vocab.tokens import (
    BYTE_TOKEN,
    DUPLICATE,
    EMPTY,
    IN_VOCABULARY,
    PARTIAL_UTF8,
    SPECIAL,
    NoNewTokensError,
    normalise_token,
    phrase_ids,
    read_token_file,
    select_new_tokens,
    split_token_string,
    target_tokenizer_candidates,
    tokens_from_spec,
)


def _find(sub, seq):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("bos", [True, False])
def test_phrase_ids_match_ids_in_running_text(tiny_tokenizer_dir, bos):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos))
    spaced = phrase_ids(tok, " Krankenwagen")
    bare = phrase_ids(tok, "Krankenwagen")
    assert len(spaced) > 1 and len(bare) > 1 and spaced != bare
    assert tok.bos_token_id not in spaced + bare
    in_text = tok("The doctor called the Krankenwagen today.", add_special_tokens=False)["input_ids"]
    assert _find(spaced, in_text)
    at_start = tok("Krankenwagen arrived.", add_special_tokens=False)["input_ids"]
    assert at_start[: len(bare)] == bare
    assert tok.decode(spaced) == " Krankenwagen"


def test_phrase_ids_on_real_tokenizer(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = phrase_ids(tok, " Krankenwagen")
    assert len(ids) > 1
    assert _find(ids, tok("Der Krankenwagen kam.", add_special_tokens=False)["input_ids"])


def test_whitespace_markers_are_normalised():
    assert normalise_token("ĠKrankenwagen") == " Krankenwagen"
    assert normalise_token("▁Krankenwagen") == " Krankenwagen"
    assert normalise_token("wagen") == "wagen"


def test_every_filter_reason_is_recorded(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(True))
    selection = select_new_tokens(
        tok, [" Krankenwagen", "ĠKrankenwagen", "", "   ", "</s>", "<0x0A>", " the", "▁Schmetterling"]
    )
    assert [t.text for t in selection.tokens] == [" Krankenwagen", " Schmetterling"]
    reasons = {s["token"]: s["reason"] for s in selection.skipped}
    assert reasons == {
        "ĠKrankenwagen": DUPLICATE,
        "": EMPTY,
        "   ": EMPTY,
        "</s>": SPECIAL,
        "<0x0A>": BYTE_TOKEN,
        " the": IN_VOCABULARY,
    }
    assert selection.skip_counts()[EMPTY] == 2


def test_empty_or_fully_filtered_lists_are_clear_errors(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(True))
    with pytest.raises(NoNewTokensError, match="empty"):
        select_new_tokens(tok, [])
    with pytest.raises(NoNewTokensError, match="already a single token"):
        select_new_tokens(tok, [" the", " river"])


def test_target_tokenizer_expansion(tiny_tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(["Der Krankenwagen und der Schmetterling fahren über die Brücke."] * 50, trainer)
    target = PreTrainedTokenizerFast(tokenizer_object=raw, additional_special_tokens=["<|im_start|>"])
    candidates, skipped = target_tokenizer_candidates(target)
    assert " Krankenwagen" in candidates and " Brücke" in candidates  # byte-level text decoded
    reasons = {s["reason"] for s in skipped}
    assert SPECIAL in reasons and PARTIAL_UTF8 in reasons  # "<|im_start|>", a lone byte of "ü"
    source = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(True))
    selection = select_new_tokens(source, target)
    texts = [t.text for t in selection.tokens]
    assert " Krankenwagen" in texts and " the" not in texts
    assert len(texts) + len(selection.skipped) == len(target.get_vocab())


def test_token_files_and_cli_strings(tmp_path):
    txt = tmp_path / "tokens.txt"
    txt.write_text(" Krankenwagen\nSchmetterling\n", encoding="utf-8")
    assert read_token_file(txt) == [" Krankenwagen", "Schmetterling"]
    js = tmp_path / "tokens.json"
    js.write_text(json.dumps([" Krankenwagen"]), encoding="utf-8")
    assert tokens_from_spec(str(js)) == [" Krankenwagen"]
    assert split_token_string(" Krankenwagen, Schmetterling") == [" Krankenwagen", " Schmetterling"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="JSON list of strings"):
        read_token_file(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_token_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("inside", ["\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\r"])
def test_a_token_file_splits_only_at_line_feeds(tmp_path, inside):
    # str.splitlines() split " façon\x85x" into " façon" and "x"
    path = tmp_path / "tokens.txt"
    path.write_text(f" façon{inside}x\n Krankenwagen\n", encoding="utf-8", newline="")
    assert read_token_file(path) == [f" façon{inside}x", " Krankenwagen"]


def test_a_crlf_token_file_loses_only_its_line_breaks(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_bytes(b" Krankenwagen\r\n\r\nSchmetterling \r\n")
    assert read_token_file(path) == [" Krankenwagen", "", "Schmetterling "]


@pytest.mark.parametrize("name, text", [("tokens.txt", " Krankenwagen\n"), ("tokens.json", '[" Krankenwagen"]')])
def test_a_byte_order_mark_is_not_part_of_the_first_token(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_token_file(path) == [" Krankenwagen"]


def test_a_lone_surrogate_in_a_json_token_file_names_the_entry(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text('[" Krankenwagen", " \\ud83d\\ude91", " Kranken\\ud800wagen"]', encoding="utf-8")
    expected = f"{path}: entry 3 (' Kranken\\ud800wagen') holds a lone surrogate"
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        read_token_file(path)
    path.write_text('[" \\ud83d\\ude91"]', encoding="utf-8")  # a whole pair is one character
    assert read_token_file(path) == [" \U0001f691"]


def test_a_token_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_bytes(" Krankenwagen\n caf\xe9\n".encode("latin-1"))
    expected = f"{path}: line 2 is not UTF-8 (byte 0xe9); save the file as UTF-8"
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        read_token_file(path)
