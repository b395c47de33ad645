"""Files and directories that a later run trusts appear whole or not at all: written
under a hidden temporary name beside the target (the same filesystem, so a rename moves
it in one step), then renamed into place. A kill or a full disk leaves the previous
content or the new, never a mix. What is written gets the modes a plain open or mkdir
gives (0666/0777 less the umask), not the 0600/0700 of tempfile.mkstemp/mkdtemp, or of
safetensors, which writes through such a temp file.

    atomic_write_text(run_dir / "state.json", json.dumps(state))  # one file: any record
    with atomic_directory(out_dir, marker="new_rows.safetensors") as partial:  # a directory
        write_everything_into(partial)
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tokdist_ray.errors import OutputWriteError

PARTIAL = "partial"  # being written: `.<name>.partial-<random>`
ASIDE = "old"  # the replaced directory, until it is deleted: `.<name>.old-<random>`


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` whole or not at all, for any file that must never be read
    half-written (a JSON record, a manifest, a report): written to a new file beside it,
    then renamed over it. A kill leaves the old file and, at worst, a hidden
    `.<name>.partial-*` file beside it."""
    path = Path(path)
    tmp = _sibling(path, PARTIAL)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """`atomic_write_bytes` for text."""
    atomic_write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, record: dict) -> None:
    """A JSON record (a report, a stage record), written whole or not at all."""
    atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False, default=str))


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextmanager
def atomic_directory(target: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Fill a new directory that then replaces `target` whole: yields an empty directory
    beside `target`; when the block ends without an error, it gets plain modes and is
    swapped in (the old `target` renamed aside, the new one into place, the old one
    deleted). An error leaves `target` as it was. A kill leaves it old or new; killed
    between the two renames, the old one is aside, and the next call puts it back.
    The next call for `target` deletes what killed calls left, so one writer per target
    at a time. `target` must be replaceable (see `check_replaceable`)."""
    target = Path(target).resolve()  # a link to a directory: that directory is replaced, beside itself
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(target)
    check_replaceable(target, marker)
    partial = partial_dir(target)
    try:
        yield partial
        give_plain_modes(partial)
        _swap(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def check_replaceable(target: str | os.PathLike, marker: str) -> None:
    """Refuse a `target` that `atomic_directory` must not replace: a file, or a folder
    that is not empty and lacks `marker` (a file only the directories it writes have),
    is someone's own, never deleted; a mount point cannot be renamed. Callers also check
    up front, before any work."""
    target = Path(target).resolve()
    if target.is_dir() and os.path.ismount(target):
        raise OutputWriteError(f"{target} is a mount point, and a new export replaces the old by renaming: "
                               f"name a folder inside it, e.g. {target / 'model'}")
    empty = target.is_dir() and not any(target.iterdir())
    if target.exists() and not empty and not (target / marker).is_file():
        raise OutputWriteError(f"{target} is not an earlier export (it has no {marker}) nor an empty folder, "
                               "and an export replaces it whole: name a new or empty folder")


def partial_dir(target: Path) -> Path:
    """A new empty directory beside `target`, `.<name>.partial-<random>`, made by a plain
    mkdir (mkdtemp's is 0700)."""
    partial = _sibling(target, PARTIAL)
    partial.mkdir()
    return partial


def give_plain_modes(root: Path) -> None:
    """Give what is under `root` (made by a plain mkdir: 0777 less the umask) the modes
    a plain mkdir or open would: `root`'s own for directories, without the execute bits
    for files (safetensors writes them 0600)."""
    directory_mode = stat.S_IMODE(root.stat().st_mode)
    for parent, directories, files in os.walk(root):
        for name, mode in [(d, directory_mode) for d in directories] + [(f, directory_mode & 0o666) for f in files]:
            path = os.path.join(parent, name)
            if not os.path.islink(path):  # chmod would follow it out of `root`
                os.chmod(path, mode)


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{secrets.token_hex(6)}")


def _leftovers(target: Path, kind: str) -> list[Path]:
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"))


def _clean_leftovers(target: Path) -> None:
    asides = _leftovers(target, ASIDE)
    if asides and not target.exists():  # killed between the swap's renames: the old one is whole
        os.rename(asides.pop(), target)
    for leftover in asides + _leftovers(target, PARTIAL):
        shutil.rmtree(leftover, ignore_errors=True)


def _swap(partial: Path, target: Path) -> None:
    aside = _sibling(target, ASIDE)
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        aside = None
    try:
        os.rename(partial, target)
    except OSError:
        if aside is not None:
            os.rename(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)  # what stays is deleted by the next call
