"""More French text for the 5,000- and 30,000-token workloads, from what Debian ships:

- the French manual pages (manpages-fr, installed by scripts/install.sh), rendered with
  groff, one .txt file per page, into runs/french-corpus/man (jobs/configs/french_5k_cpu.yaml);
- with --manuals, the French HTML manuals of several packages (GIMP, LibreOffice, the
  Debian Administrator's Handbook, KiCad, LilyPond, Debian Edu, aptitude, TeXworks, the
  Ubuntu packaging guide), fetched with `apt-get download` (nothing is installed) and
  rendered to text, one .txt file per page, into runs/french-corpus/manuals, and the
  French manual pages for developers (manpages-fr-dev) into runs/french-corpus/man-dev:
  text for a 30,000-token workload.

    python bench/french_corpus.py [--manuals]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

MAN_PAGES = Path("/usr/share/man/fr")
# package -> the French HTML pages in it (globs under its extracted tree)
MANUALS = {
    "gimp-help-fr": ["usr/share/gimp/2.0/help/fr/**/*.html"],
    "libreoffice-help-fr": ["usr/share/libreoffice/help/fr/**/*.html"],
    "debian-handbook": ["usr/share/doc/debian-handbook/html/fr-FR/*.html"],
    "kicad-doc-fr": ["usr/share/doc/kicad/help/fr/*.html"],
    "lilypond-doc-html-fr": ["usr/share/doc/lilypond/html/Documentation/*-big-page.fr.html"],
    "debian-edu-doc-fr": ["usr/share/doc/debian-edu-doc-fr/debian-edu-bookworm-manual.html"],
    "aptitude-doc-fr": ["usr/share/doc/aptitude/html/fr/*.html"],
    "texworks-help-fr": ["usr/share/texworks-help/fr/**/*.html"],
    "ubuntu-packaging-guide-html-fr": ["usr/share/doc/ubuntu-packaging-guide-html-fr/**/*.html"],
}
MANUAL_PAGES = ("manpages-fr-dev",)  # rendered as the installed pages are


def render_man_pages(out: Path, pages: Path = MAN_PAGES) -> int:
    """Each gzipped page under `pages`, read as UTF-8, as text (no overstrikes or colours) in
    `out`; returns the bytes written. Every page is rendered on each call (seconds), so no
    file of an earlier rendering is left beside the new ones."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for page in sorted(pages.rglob("*.gz")):
        target = out / f"{page.parent.name}-{page.name.removesuffix('.gz')}.txt"
        text = subprocess.run(["groff", "-K", "utf8", "-mandoc", "-Tutf8", "-P-cbou"],
                              input=gzip.decompress(page.read_bytes()), capture_output=True,
                              env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}).stdout
        target.write_bytes(text)
        total += target.stat().st_size
    return total


class PageText(HTMLParser):
    """The text a browser shows, a line per block; scripts, styles and navigation left out."""

    SKIPPED = {"script", "style", "nav", "head"}
    BLOCKS = {"p", "div", "li", "tr", "br", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table", "section"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self.SKIPPED
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skipping -= tag in self.SKIPPED and self.skipping > 0
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)

    def text(self) -> str:
        lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(self.parts).split("\n"))
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def html_text(html: str) -> str:
    parser = PageText()
    parser.feed(html)
    parser.close()
    return parser.text()


def render_manuals(out: Path, debs: Path) -> int:
    """The French pages of MANUALS' packages as text in `out`, a file per distinct page
    (the same page shipped twice is kept once); returns the bytes written."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in (*MANUALS, *MANUAL_PAGES) if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    tree = debs / "tree"
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    out.mkdir(parents=True, exist_ok=True)
    seen, total = set(), 0
    for package, patterns in MANUALS.items():
        for page in sorted(p for pattern in patterns for p in tree.glob(pattern) if p.is_file()):
            text = html_text(page.read_text(encoding="utf-8", errors="replace"))
            digest = hashlib.sha1(text.encode()).digest()
            if len(text) < 200 or digest in seen:  # navigation stubs and copies
                continue
            seen.add(digest)
            target = out / f"{package}-{page.relative_to(tree).as_posix().replace('/', '_')}.txt"
            target.write_text(text, encoding="utf-8")
            total += target.stat().st_size
    return total


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/french-corpus", help="man/ and manuals/ are written under it")
    ap.add_argument("--manuals", action="store_true", help="also the French HTML manuals (about 150 MB of packages)")
    ap.add_argument("--debs", default="runs/french-debs", help="where the packages are downloaded and extracted")
    args = ap.parse_args()
    out = Path(args.out)
    print(f"{render_man_pages(out / 'man') / 1e6:.1f} MB of French manual pages in {out / 'man'}")
    if args.manuals:
        print(f"{render_manuals(out / 'manuals', Path(args.debs)) / 1e6:.1f} MB of French manuals in {out / 'manuals'}")
        pages = render_man_pages(out / "man-dev", Path(args.debs) / "tree" / "usr/share/man/fr")
        print(f"{pages / 1e6:.1f} MB of French manual pages for developers in {out / 'man-dev'}")
