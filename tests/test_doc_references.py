"""Every file that code, tests, configs and docs point to exists in the repository.

A path such as ``docs/cpu.md`` or ``dist_train/optim/radam.py`` named in a docstring, a comment or a page,
and every relative markdown link, must resolve: a user who clones the project has nothing outside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = ("docs", "dist_train", "tests", "benchmarks", "configs", "requirements", "docker", "launch", ".ci")
# A repository path: one of the top-level folders, then path characters, ending in a file extension.
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*\.(?:md|py|yaml|yml|txt|json|sh|toml|cfg))(?![\w/])"
                  % "|".join(re.escape(t) for t in TOP))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # markdown links, without their anchors
FILES = sorted({*REPO.glob("*.md"), REPO / "Makefile", REPO / "pyproject.toml",
                *(p for top in TOP for p in (REPO / top).rglob("*")
                  if p.suffix in (".py", ".md", ".yaml", ".toml", ".sh") and ".cache" not in p.parts)})


def references(file: Path) -> list[tuple[str, Path]]:
    """(as written, where it should be) for each path and relative link in ``file``."""
    text = file.read_text(errors="replace")
    found = [(m, REPO / m) for m in PATH.findall(text)]
    if file.suffix == ".md":
        found += [(m, (file.parent / m)) for m in LINK.findall(text) if "://" not in m and not m.startswith("mailto:")]
    return found


def test_the_scan_finds_references():
    # The scan itself must see something, or the test below could never fail.
    assert ("docs/cpu.md", REPO / "docs/cpu.md") in references(REPO / "dist_train" / "cpu.py")
    assert len(FILES) > 100 and sum(len(references(f)) for f in FILES) > 100


@pytest.mark.parametrize("file", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_referenced_file_exists(file):
    missing = [written for written, target in references(file) if not target.exists()]
    assert not missing, f"{file.relative_to(REPO)} points to files that do not exist: {missing}"
