"""What a job's input files hold, for its stage keys: a file edited or replaced at the
same path must rerun the stages it feeds, not reuse what they made from the old one.

Small files (a tokens list) are hashed; corpora, held-out text and model folders are
described by each file's path, size and modification time, as the mining cache keys
them, so a key costs a directory listing, not a read of gigabytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokdist_ray.config import FileDataSource, HFDataSource


def content_digest(path: str | None) -> str | None:
    if not path:
        return None
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def model_files(model: str | None) -> list | None:
    """A local model folder's (or GGUF file's) files with sizes and times; None for a hub
    id or a bundled name, whose name is the key (a hub revision is pinned by name)."""
    if not model:
        return None
    path = Path(model).expanduser()
    if not path.exists():
        return None
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    return [[f.name, *_size_and_time(f)] for f in files]


def corpus_files(source: FileDataSource | HFDataSource | None) -> dict | None:
    """The corpus as the mining cache keys it: files with sizes and times, or the dataset spec."""
    if source is None:
        return None
    from tokdist_ray.data.corpus.sources import corpus_reader

    return corpus_reader(source).spec()


def heldout_files(paths: list[str]) -> list | None:
    if not paths:
        return None
    return corpus_files(FileDataSource(paths=list(paths)))["files"]


def _size_and_time(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
