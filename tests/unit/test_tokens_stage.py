"""The job's tokens stage: tokens chosen from the corpus by continued BPE, the expanded
tokenizer saved for every later stage, tokens.json with what users need to judge them."""

import json

from transformers import AutoTokenizer

from tokdist_ray.config import FileDataSource
from tokdist_ray.job.config import DataConfig, EvalConfig, JobConfig, TokensConfig
from tokdist_ray.job.stages import select_tokens
from tokdist_ray.vocab.bpe_training import continue_bpe, pre_token_counts
from tokdist_ray.vocab.expansion_files import load_expansion
from tokdist_ray.vocab.merges import expand_with_merges


def test_continued_bpe_tokens_and_the_saved_tokenizer(tiny_tokenizer_dir, job_corpus_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    config = JobConfig(
        model=str(tiny_tokenizer_dir()), run_dir=str(tmp_path),
        tokens=TokensConfig(from_corpus=6, min_count=3), data=DataConfig(corpus=FileDataSource(paths=[str(job_corpus_dir)])),
        eval=EvalConfig(heldout_paths=[str(job_corpus_dir)]),
    ).validate()
    outputs = select_tokens(config, tokenizer, tmp_path)

    texts = [p.read_text() for p in sorted(job_corpus_dir.iterdir())]
    learned = continue_bpe(tokenizer, pre_token_counts(tokenizer, texts), 6, min_count=3)
    saved = json.loads((tmp_path / "tokens.json").read_text())
    assert [t["token"] for t in saved["tokens"]] == [t.text for t in learned]  # merge order, no intermediates
    assert [t["corpus_count"] for t in saved["tokens"]] == [t.count for t in learned]
    assert all(t["corpus_count"] >= 3 for t in saved["tokens"]) and saved["mode"] == "merges"
    compression = saved["expected_compression"]
    assert compression["tokens_after"] < compression["tokens_before"]

    expansion = load_expansion(outputs["tokenizer_path"])
    direct = expand_with_merges(tokenizer, [t.text for t in learned])
    assert [t.phrase_ids for t in expansion.tokens] == [t.phrase_ids for t in direct.tokens]
    for text in texts:
        assert expansion.tokenizer(text)["input_ids"] == direct.tokenizer(text)["input_ids"]
        assert expansion.tokenizer.decode(expansion.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
