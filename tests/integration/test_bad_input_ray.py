"""Corpus files that cannot be read, met inside Ray Data read tasks and mining actors: the
user sees one line naming the file and the fix and exit code 2, as for config errors, not
Ray's tracebacks. Each case as a user would meet it with `tokdist-ray run`."""

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import SENTENCES, run_cli, tiny_job_args

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def jsonl_gz(texts: list[str]) -> bytes:
    return gzip.compress(("\n".join(json.dumps({"text": t}) for t in texts) + "\n").encode())


def no_text_column(path):
    pq.write_table(pa.table({"body": SENTENCES * 2}), path)


def not_parquet(path):
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")


def truncated_gz(path):
    data = jsonl_gz(SENTENCES * 50)
    path.write_bytes(data[: len(data) // 2])


def job_args(model_dir, corpus, heldout, run_dir) -> list[str]:
    """A small job mining `corpus`; held-out text elsewhere (the tokens stage reads it in
    this process, to estimate the compression), so that the error is met on Ray."""
    args = tiny_job_args(model_dir, corpus, run_dir)
    args[args.index("--eval.heldout_paths") + 1] = str(heldout)
    return args


def refused(code: int, err: str, *phrases: str) -> str:
    """The user's one line; asserts exit 2, no traceback, and each phrase in the line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("tokdist-ray: error: corpus file "), err
    for phrase in phrases:
        assert phrase in line, line
    return line


@pytest.mark.parametrize("name, write, fix", [
    ("corpus.parquet", no_text_column,
     "has no column 'text' (its columns: ['body']); set text_column (data.text_column in a job)"),
    ("corpus.parquet", not_parquet, "cannot be read as parquet: Parquet magic bytes not found"),
    ("corpus.jsonl.gz", truncated_gz, "cannot be read: its .gz stream is truncated; copy or download the file again"),
])
def test_a_corpus_file_that_cannot_be_mined_is_one_line(
        ray_session, tiny_model_dir, job_corpus_dir, tmp_path, capsys, name, write, fix):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus / name)
    code, err = run_cli(job_args(tiny_model_dir(), corpus, job_corpus_dir, tmp_path / "run"), capsys)
    refused(code, err, f"corpus file {corpus / name}: ", fix)
    assert "stage snippets: running" in err, "met while mining, not before"


def test_a_gz_found_truncated_after_blocks_were_mined_names_the_file(ray_session, tiny_model_dir, job_corpus_dir, tmp_path, capsys):
    """More text than one block of a read task (corpus_parts.BLOCK_BYTES), none of it with
    the new tokens, so that miners work on the first blocks before the read hits the end."""
    rng = random.Random(0)
    words = "the river market bread cheese station garden library window morning".split()
    texts = [" ".join(rng.choice(words) for _ in range(40)) + f" row {i}." for i in range(8000)]  # 2.4 MB
    data = jsonl_gz(texts)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "big.jsonl.gz").write_bytes(data[: int(len(data) * 0.95)])
    code, err = run_cli(job_args(tiny_model_dir(), corpus, job_corpus_dir, tmp_path / "run"), capsys)
    line = refused(code, err, f"corpus file {corpus / 'big.jsonl.gz'}: cannot be read after ", "stream is truncated")
    assert int(line.split("read after ")[1].split()[0]) > 6000, line  # rows past the first block
    assert "stage snippets: running" in err, "met while mining, not before"


def test_tokens_chosen_from_a_corpus_file_that_is_not_parquet_is_one_line(
        ray_session, tiny_model_dir, job_corpus_dir, tmp_path, capsys):
    """The tokens stage counts pre-tokens on Ray Data too (continued BPE training)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    not_parquet(corpus / "corpus.parquet")
    args = job_args(tiny_model_dir(), corpus, job_corpus_dir, tmp_path / "run")
    at = args.index("--tokens.list")
    args[at:at + 2] = ["--tokens.from_corpus", "4"]
    code, err = run_cli(args, capsys)
    refused(code, err, f"corpus file {corpus / 'corpus.parquet'}: cannot be read as parquet")
    assert "stage snippets" not in err, err
