"""The export appears whole or not at all: a failed or killed re-export leaves the previous
one byte for byte, a successful one leaves nothing of it, and what is written has the
modes a plain open/mkdir gives (safetensors and mkdtemp would make it 0600/0700)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import WORDS
from tokdist_ray import atomic
from tokdist_ray.atomic import atomic_directory, atomic_write_text
from tokdist_ray.errors import OutputWriteError, TokdistError
from tokdist_ray.export.gguf import GGUF_FILE, GgufOptions, export_gguf
from tokdist_ray.export.model import ROWS, save_model
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import materialise_gguf


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it (the export's `finally` still runs, a real
    kill's would not; the tests that need that leave the export suspended instead)."""


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def modes(directory: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [directory, *directory.rglob("*")]}


@pytest.fixture
def export(tiny_model_dir):
    """export(out, seed, gguf=False) -> the rows written: the tiny model expanded by WORDS."""
    model_dir = tiny_model_dir(tied=False)
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(model_dir), WORDS)

    def run(out: Path, seed: int, gguf: bool = False) -> torch.Tensor:
        rows = torch.randn(len(expansion.tokens), 64, generator=torch.Generator().manual_seed(seed))
        save_model(str(model_dir), expansion, {"input": rows}, out, {"model": "tiny", "seed": seed},
                   gguf=GgufOptions("f32") if gguf else None)
        return rows

    run.new_start = expansion.new_start
    return run


def new_rows_of(out: Path, new_start: int, n: int) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight[new_start:new_start + n]


def test_a_reexport_that_fails_midway_leaves_the_previous_export_as_it_was(export, tmp_path, monkeypatch):
    out = tmp_path / "run" / "model"
    first = export(out, seed=1, gguf=True)
    before = contents(out)

    def fail(*args, **kwargs):
        raise Killed  # after the shards, the tokenizer and report.json were written
    monkeypatch.setattr("tokdist_ray.export.model.write_rows", fail)
    with pytest.raises(Killed):
        export(out, seed=2)

    assert contents(out) == before
    assert torch.equal(new_rows_of(out, export.new_start, len(first)), first)
    assert os.listdir(out.parent) == ["model"]  # no partial export beside it


def test_a_reexport_replaces_the_previous_one_whole(export, tmp_path):
    out, fresh = tmp_path / "model", tmp_path / "fresh"
    export(out, seed=1, gguf=True)
    assert (out / GGUF_FILE).is_file()
    second = export(out, seed=2)  # without the GGUF now
    export(fresh, seed=2)

    assert contents(out) == contents(fresh)  # report.json included: nothing of the first run is left
    assert torch.equal(new_rows_of(out, export.new_start, len(second)), second)
    assert sorted(os.listdir(tmp_path)) == ["fresh", "model"]


@pytest.mark.parametrize("umask,directory_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_the_export_has_the_modes_of_a_plain_mkdir_and_open(export, tmp_path, umask, directory_mode, file_mode):
    previous = os.umask(umask)
    try:
        export(tmp_path / "model", seed=1, gguf=True)
        atomic_write_text(tmp_path / "record.json", "{}")
    finally:
        os.umask(previous)
    assert modes(tmp_path / "model") == {("dir", directory_mode), ("file", file_mode)}
    assert stat.S_IMODE((tmp_path / "record.json").stat().st_mode) == file_mode


def test_the_gguf_cache_has_plain_modes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKDIST_RAY_CACHE", str(tmp_path / "cache"))
    gguf = export_gguf(tiny_model_dir(tied=False), tmp_path / "tiny.gguf", "f32")
    previous = os.umask(0o022)
    try:
        cached = materialise_gguf(gguf)
    finally:
        os.umask(previous)
    assert modes(cached) == {("dir", 0o755), ("file", 0o644)}


@pytest.mark.parametrize("where,error", [
    ("tokdist_ray.export.streamed.save_file",  # what safetensors raises for ENOSPC
     SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
    ("tokdist_ray.export.model.export_gguf", OSError(28, "No space left on device", "model.gguf")),
])
def test_a_full_disk_is_one_clear_error_and_the_previous_export_stays(export, tmp_path, monkeypatch, where, error):
    out = tmp_path / "model"
    export(out, seed=1)
    before = contents(out)

    def full(*args, **kwargs):
        raise error
    monkeypatch.setattr(where, full)
    with pytest.raises(OutputWriteError) as raised:
        export(out, seed=2, gguf=True)

    message = str(raised.value)
    assert isinstance(raised.value, TokdistError) and isinstance(raised.value, OSError)
    assert f"cannot write the export {out}: " in message and "No space left on device" in message
    assert " for the weights, and about as much for the GGUF" in message and f"{out} is left as it was" in message
    assert contents(out) == before and os.listdir(tmp_path) == ["model"]


def test_a_folder_that_is_not_an_export_is_refused_before_any_work(export, tiny_model_dir, tmp_path):
    from tokdist_ray import TokenDistillation

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"keep me too")
    for theirs in (mine, a_file):
        with pytest.raises(OutputWriteError, match=f"{theirs} is not an earlier export"):
            export(theirs, seed=1)
    with pytest.raises(OutputWriteError, match="not an earlier export"):  # the API checks before it mines
        TokenDistillation(str(tiny_model_dir(tied=False)), device="cpu").run(WORDS, out_path=str(mine), save=True)
    assert contents(mine) == {"notes.txt": b"keep me"} and a_file.read_bytes() == b"keep me too"
    export(tmp_path / "empty", seed=1)  # new, or empty, is fine
    (tmp_path / "empty2").mkdir()
    export(tmp_path / "empty2", seed=1)



def test_a_job_refuses_a_folder_that_is_not_an_export_before_ray_but_mining_alone_may_use_it(
        tiny_model_dir, job_corpus_dir, tmp_path, capsys, ray_starts):
    from tests.helpers import run_cli, tiny_job_args
    from tokdist_ray.job.checks import check_job
    from tokdist_ray.job.config import load_config, parse_overrides

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = tiny_job_args(tiny_model_dir(tied=False), job_corpus_dir, tmp_path / "run") + ["--out_path", str(mine)]
    code, err = run_cli(args, capsys)
    assert code == 2 and f"{mine} is not an earlier export" in err and ray_starts == []
    assert contents(mine) == {"notes.txt": b"keep me"}
    check_job(load_config(None, parse_overrides(args)), exports=False)  # `tokdist-ray mine` writes no model there

# --- kills, on atomic_directory itself --------------------------------------------------------


def old_export(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    (target / ROWS).write_text("old")
    return target


def test_a_killed_export_leaves_the_old_one_and_its_leftovers_go_with_the_next(tmp_path):
    target = old_export(tmp_path)
    killed = atomic_directory(target, ROWS)
    partial = killed.__enter__()  # never left: the process died while writing
    (partial / ROWS).write_text("half")
    assert contents(target) == {ROWS: b"old"}
    assert [p.name for p in tmp_path.iterdir() if p != target] == [partial.name] and partial.name.startswith(".")

    with atomic_directory(target, ROWS) as again:
        assert not partial.exists()  # the leftover was cleaned, and never taken for the export
        (again / ROWS).write_text("new")
    assert contents(target) == {ROWS: b"new"} and os.listdir(tmp_path) == ["model"]


def test_killed_between_the_swaps_renames_the_old_export_is_put_back(tmp_path, monkeypatch):
    target = old_export(tmp_path)
    rename, renames = os.rename, []

    def dies_on_the_second(src, dst):
        renames.append(dst)
        if len(renames) == 2:  # the old one is aside, the new one not yet in place
            raise Killed
        rename(src, dst)
    monkeypatch.setattr(atomic.os, "rename", dies_on_the_second)
    with pytest.raises(Killed):
        with atomic_directory(target, ROWS) as partial:
            (partial / ROWS).write_text("new")
    monkeypatch.undo()
    assert not target.exists() and ".model.old-" in str(renames[0])

    with pytest.raises(RuntimeError):
        with atomic_directory(target, ROWS):
            raise RuntimeError("the next export fails too")
    assert contents(target) == {ROWS: b"old"} and os.listdir(tmp_path) == ["model"]
