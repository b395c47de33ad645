"""The documentation keeps up with the code: the configuration reference names every
option the config dataclasses have, the README stays short and its quick start is what CI
runs, and no page points at an issue tracker entry instead of saying what it means."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
CI_RUN = ROOT / ".ci" / "run"
CONFIG_MODULES = ("tokdist_ray.config", "tokdist_ray.job.config")
README_MAX_BYTES = 12 * 1024
# "issue 12", "issues 21 and 22", "(issue #7)", "issue-15"
ISSUE_REFERENCE = re.compile(r"\bissues?[\s#-]*\d+", re.IGNORECASE)
NOT_DOCS = {".git", ".venv", "runs", "build", "dist", "node_modules", ".pytest_cache"}


# ------------------------------------------------------------------ the configuration reference
def config_classes() -> list[type]:
    """Every dataclass declared in the config modules, as the code has it today."""
    classes = []
    for name in CONFIG_MODULES:
        module = importlib.import_module(name)
        classes += [cls for _, cls in inspect.getmembers(module, dataclasses.is_dataclass)
                    if inspect.isclass(cls) and cls.__module__ == name]
    return classes


def job_keys(cls=None, prefix: str = "") -> list[str]:
    """The job config's keys as YAML paths (`training.learning_rate`), nested sections walked;
    the data section's corpus by the settings of each source it may name."""
    from tokdist_ray.config import CORPUS_SOURCES
    from tokdist_ray.job.config import API_ONLY, DataConfig, JobConfig

    cls = cls or JobConfig
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if cls is DataConfig and f.name == "corpus":
            keys += [prefix + s.name for source in CORPUS_SOURCES.values() for s in dataclasses.fields(source)
                     if s.name not in API_ONLY]
            continue
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += job_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def sections(markdown: str) -> list[tuple[str, str]]:
    """(heading, body) for every heading; a body runs to the next heading of its level or above."""
    lines = markdown.splitlines()
    heads, fenced = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6})\s", line)):
            heads.append((i, len(m.group(1))))
    out = []
    for n, (i, level) in enumerate(heads):
        end = next((j for j, lv in heads[n + 1:] if lv <= level), len(lines))
        out.append((lines[i], "\n".join(lines[i + 1:end])))
    return out


def named(option: str, text: str) -> bool:
    """`option` written as code, alone or as the last part of a dotted key (`training.seed`)."""
    return re.search(r"`(?:[\w.]+\.)?" + re.escape(option) + r"`", text) is not None


def missing_from_reference(doc: str) -> list[str]:
    missing = [f"job key {key}" for key in job_keys() if f"`{key}`" not in doc]
    for cls in config_classes():
        found = [body for heading, body in sections(doc) if re.search(rf"\b{cls.__name__}\b", heading)]
        if not found:
            missing.append(f"a heading naming {cls.__name__}")
            continue
        missing += [f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls) if not named(f.name, found[0])]
    return missing


def test_configuration_reference_names_every_option():
    missing = missing_from_reference(CONFIGURATION.read_text(encoding="utf-8"))
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"


def test_configuration_check_fails_on_a_missing_option():
    doc = CONFIGURATION.read_text(encoding="utf-8")
    assert "`training.learning_rate`" in doc
    dropped = doc.replace("`training.learning_rate`", "`training.rate`")
    assert "job key training.learning_rate" in missing_from_reference(dropped)
    first = config_classes()[0]
    renamed = re.sub(rf"\b{first.__name__}\b", "SomethingElse", doc)
    assert f"a heading naming {first.__name__}" in missing_from_reference(renamed)


def test_the_config_walk_sees_nested_sections():
    keys = job_keys()
    assert {"model", "training", "training.learning_rate", "distributed.strategy", "eval.heldout_paths"} <= set(keys)
    assert {"DistillationConfig", "JobConfig", "FileDataSource"} <= {cls.__name__ for cls in config_classes()}


# ------------------------------------------------------------------ the README
def quick_start(readme: str) -> list[str]:
    """The command lines of the first code block under the Quick start heading."""
    body = next(body for heading, body in sections(readme) if re.match(r"#+\s+Quick start", heading))
    block = re.search(r"```\w*\n(.*?)```", body, re.DOTALL)
    assert block, "the Quick start section has no code block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def ci_commands() -> list[str]:
    """What .ci/run runs of the README's commands: its lines that install, run the demo or test."""
    lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    return [line for line in lines if line.startswith(("bash scripts/", ".venv/bin/python"))]


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; keep it to {README_MAX_BYTES} and move detail to docs/"


def test_readme_quick_start_is_what_ci_runs():
    commands = ci_commands()
    assert commands == ["bash scripts/install.sh && .venv/bin/python jobs/expand_vocab.py",
                        ".venv/bin/python -m pytest -q tests"]
    assert quick_start(README.read_text(encoding="utf-8")) == commands


def test_quick_start_check_fails_on_an_edited_command():
    readme = README.read_text(encoding="utf-8")
    edited = readme.replace(".venv/bin/python -m pytest -q tests", ".venv/bin/python -m pytest tests", 1)
    assert quick_start(edited) != ci_commands()


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` whose file, or whose #anchor in a Markdown file, does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page.resolve()
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = [re.sub(r"^#+\s+", "", h) for h, _ in sections(dest.read_text(encoding="utf-8"))]
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    return broken


def test_links_between_pages_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
    assert "docs/configuration.md" in README.read_text(encoding="utf-8"), "the README links to no reference"
    broken = {str(p.relative_to(ROOT)): links for p in pages if (links := broken_links(p))}
    assert not broken, f"links to missing pages or headings: {broken}"


def test_link_check_fails_on_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `code` heading: here\n\n[ok](#a-code-heading-here) [bad](#nowhere) [gone](gone.md)\n")
    assert broken_links(page) == ["#nowhere", "gone.md"]


# ------------------------------------------------------------------ issue references
def markdown_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.md")
                  if not NOT_DOCS & set(p.relative_to(ROOT).parts) and not any(
                      part.endswith(".egg-info") for part in p.relative_to(ROOT).parts))


def issue_references(text: str) -> list[str]:
    return ISSUE_REFERENCE.findall(text)


def test_no_page_cites_issue_numbers():
    pages = markdown_files()
    assert README in pages and CONFIGURATION in pages
    found = {str(p.relative_to(ROOT)): refs for p in pages if (refs := issue_references(p.read_text(encoding="utf-8")))}
    assert not found, f"say what an issue meant instead of citing it: {found}"


@pytest.mark.parametrize("text", ["as in issue 12.", "(issue 23)", "issues 22 part 1", "Issue #7", "issue-15"])
def test_issue_check_catches(text):
    assert issue_references(text)


@pytest.mark.parametrize("text", ["a known issue with 2 nodes", "the issue is 3 bytes", "tissue 5"])
def test_issue_check_leaves_prose_alone(text):
    assert not issue_references(text)
