"""The mining cache: results live under `out_dir/mining-<key>/` (snippets parquet, then
report.json, written last, which marks the result complete). The key hashes the corpus
(files with sizes and mtimes, or the HF dataset spec), the tokenizer's full definition,
the tokens and the settings, so a rerun with the same inputs reads them back.
"""

from __future__ import annotations

import hashlib
import json
import marshal
from dataclasses import asdict
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.corpus.files import CorpusFiles
from tokdist_ray.data.mining.miner import TokenizerSpec
from tokdist_ray.fingerprint import fingerprint
from tokdist_ray.storage import location

if TYPE_CHECKING:
    from tokdist_ray.vocab.tokens import NewToken

CACHE_VERSION = 2  # 2: snippets in the expanded tokenizer's ids; bump when the output for the same inputs changes


def _function_fingerprint(fn) -> str | None:
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    body = marshal.dumps(code) if code is not None else repr(fn).encode()
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}:{hashlib.sha256(body).hexdigest()}"


def corpus_spec(source: FileDataSource | HFDataSource, files: CorpusFiles | None) -> dict:
    if isinstance(source, FileDataSource):
        return {
            "files": [list(f) for f in zip(files.paths, files.sizes, files.mtimes)],
            "text_column": source.text_column,
            "max_docs": source.max_docs,
        }
    spec = {k: v for k, v in asdict(source).items() if k not in ("map_to_text_fn", "tokenization_batch_size")}
    return {**spec, "map_to_text_fn": _function_fingerprint(source.map_to_text_fn)}


def cache_key(corpus: dict, tokenizer: TokenizerSpec, tokens: Sequence[NewToken], settings: dict) -> str:
    return fingerprint({
        "version": CACHE_VERSION,
        "corpus": corpus,
        "tokenizer": tokenizer.fingerprint(),
        "tokens": [[t.text, list(t.phrase_ids)] for t in tokens],
        "settings": settings,
    }, length=24)


def write_cache(out: str, table: pa.Table, report: dict) -> None:
    fs, root = location(out)
    fs.create_dir(f"{root}/snippets", recursive=True)
    pq.write_table(table, f"{root}/snippets/corpus.parquet", filesystem=fs)
    with fs.open_output_stream(f"{root}/report.json") as f:  # written last: marks the result complete
        f.write(json.dumps(report, indent=1).encode())


def read_cache(out: str) -> dict | None:
    """The cached result's report, or None when there is no complete result (its report
    cut short by a kill counts as none: mining runs again and writes it anew)."""
    fs, root = location(out)
    if fs.get_file_info(f"{root}/report.json").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/report.json") as f:
        try:
            return json.loads(f.read())
        except ValueError:
            return None
