"""Where files live: local paths and URIs of any pyarrow filesystem (s3://, gs://, file://)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def location(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path (made absolute), a URI, or a path on a
    given filesystem."""
    if filesystem is not None:
        return filesystem, path
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers start in directories of their own); URIs as given."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())
