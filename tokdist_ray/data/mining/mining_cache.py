"""The mining cache: results live under `out_dir/mining-<key>/` (snippets parquet, then
report.json, written last, which marks the result complete). The key hashes the corpus
(files with sizes and mtimes, or the HF dataset spec), the tokenizer's full definition,
the tokens and the settings, so a rerun with the same inputs reads them back.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tokdist_ray.data.mining.miner import TokenizerSpec
from tokdist_ray.fingerprint import fingerprint
from tokdist_ray.storage import location

if TYPE_CHECKING:
    from tokdist_ray.vocab.tokens import NewToken

CACHE_VERSION = 2  # 2: snippets in the expanded tokenizer's ids; bump when the output for the same inputs changes


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
