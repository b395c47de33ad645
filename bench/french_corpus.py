"""More French text for the 5,000-token workload: Debian's French manual pages
(manpages-fr, installed by scripts/install.sh), rendered to plain text with groff, one
.txt file per page, into a folder a job config reads (jobs/configs/french_5k_cpu.yaml).

    python bench/french_corpus.py [--out runs/french-corpus/man]
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
from pathlib import Path

MAN_PAGES = Path("/usr/share/man/fr")


def render_man_pages(out: Path, pages: Path = MAN_PAGES) -> int:
    """Each gzipped page under `pages` as UTF-8 text (no overstrikes or colours) in `out`;
    returns the bytes written. Pages already rendered are kept."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for page in sorted(pages.rglob("*.gz")):
        target = out / f"{page.parent.name}-{page.name.removesuffix('.gz')}.txt"
        if not target.exists():
            text = subprocess.run(["groff", "-mandoc", "-Tutf8", "-P-cbou"], input=gzip.decompress(page.read_bytes()),
                                  capture_output=True, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}).stdout
            target.write_bytes(text)
        total += target.stat().st_size
    return total


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/french-corpus/man")
    args = ap.parse_args()
    print(f"{render_man_pages(Path(args.out)) / 1e6:.1f} MB of French manual pages in {args.out}")
