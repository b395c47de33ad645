"""The layering is a contract that CI checks: `lint-imports` (import-linter) with the
contracts in pyproject.toml ([tool.importlinter]) passes on the repository, and the same
contracts catch an upward import, a cycle between sibling modules and an import between
independent siblings, lazy (function-level) imports included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = "install it with `.venv/bin/pip install -e '.[dev]'` (bash scripts/install.sh does)"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the package under `cwd`, with the pyproject.toml there (uncached:
    it writes nothing into the tree)."""
    script = Path(sys.executable).with_name("lint-imports")
    command = str(script) if script.exists() else shutil.which("lint-imports")
    if command is None:
        pytest.fail(f"lint-imports (import-linter) is not installed; {INSTALL}", pytrace=False)
    env = {**os.environ, "COLUMNS": "200"}  # its report wraps at the terminal's width
    return subprocess.run([command, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def report(run: subprocess.CompletedProcess) -> str:
    """lint-imports' output without its logo."""
    out = run.stdout + run.stderr
    return out[out.find("Contracts"):] if "Contracts" in out else out


def test_the_package_keeps_its_import_contracts():
    run = lint_imports(REPO)
    if run.returncode != 0:
        pytest.fail(f"lint-imports found broken import contracts (pyproject.toml):\n{report(run)}", pytrace=False)


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((path.read_text(encoding="utf-8") if path.exists() else "") + text, encoding="utf-8")


def test_the_contracts_catch_upward_imports_cycles_and_imports_between_siblings(tmp_path):
    """A copy of the package with four bad imports, each inside a function (as lazy
    imports are written), checked with the repository's own contracts."""
    shutil.copytree(REPO / "tokdist_ray", tmp_path / "tokdist_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    package = tmp_path / "tokdist_ray"
    _append(package / "errors.py", "\n\ndef _upward():\n    from tokdist_ray.job import cli  # noqa: F401\n")
    _append(package / "data" / "generation" / "vllm_backend.py",
            "\n\ndef _back_to_the_driver():\n    from tokdist_ray.data.generation import ray_backend  # noqa: F401\n")
    _append(package / "data" / "corpus" / "files.py",
            "\n\ndef _reads_snippets():\n    from tokdist_ray.data import snippets  # noqa: F401\n")
    # tokdist_ray.export: training's independent sibling
    _append(package / "export" / "__init__.py", "\n\ndef _sideways():\n    import tokdist_ray.training.rows  # noqa: F401\n")

    run = lint_imports(tmp_path)
    out = report(run)
    assert run.returncode == 1, out
    out = " ".join(out.split())
    assert "tokdist_ray.errors is not allowed to import tokdist_ray.job" in out
    assert "tokdist_ray.errors -> tokdist_ray.job.cli" in out
    assert ("tokdist_ray.data.generation.vllm_backend is not allowed to import "
            "tokdist_ray.data.generation.ray_backend") in out
    assert "No cycles are allowed in tokdist_ray.data.generation" in out
    assert "tokdist_ray.export is not allowed to import tokdist_ray.training" in out
    assert "tokdist_ray.data.corpus is not allowed to import tokdist_ray.data.snippets" in out


def test_the_file_names_preflight_keeps_below_training_are_their_owners():
    """preflight sits below training and the export, so it names the files it checks itself:
    the Hugging Face weight files and the marker only a finished export has."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    from tokdist_ray import preflight
    from tokdist_ray.export.model import ROWS

    assert (preflight.INDEX, preflight.SINGLE) == (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME)
    assert preflight.EXPORT_MARKER == ROWS
