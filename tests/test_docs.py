"""
The README and docs/ cite only files that are in the repository, and the
README's test command is the one CI runs.
"""

from __future__ import annotations

import glob
import os
import re

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A path with a directory (zaichik/storage/disk.py, docs/storage.rst,
# benchmarks/) or a file name with one of these extensions (setup.py).
PATH = re.compile(r"(?<![\w/.:$-])((?:[\w.-]+/)+(?:[\w.-]+)?|[\w.-]+\.(?:py|rst|md|cfg|toml|txt))(?![\w/-])")


def documents() -> list:
    return [os.path.join(ROOT, "README.rst")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.rst")))


FILE_EXTENSIONS = (".py", ".rst", ".md", ".cfg", ".toml", ".txt")


def cited(text: str) -> set:
    """
    The paths C{text} cites: those ending in a file extension, and those
    whose first part is in the repository (zaichik/..., benchmarks/); not
    words with a slash (pub/sub, I/O, sensors/temp) nor URLs.
    """
    top = set(os.listdir(ROOT))
    found = set()
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if "://" in text[max(0, match.start() - 10):match.start()]:
            continue
        first = path.lstrip("/").split("/", 1)[0]
        if path.endswith(FILE_EXTENSIONS) or (first in top and "/" in path and not path.startswith("/")):
            found.add(path)
    return found


def exists(path: str, document: str) -> bool:
    if "/" not in path.rstrip("/"):
        # a bare file name: anywhere in the repository (setup.py, segment.py)
        name = path.rstrip("/")
        return bool(glob.glob(os.path.join(ROOT, "**", name), recursive=True))
    return any(os.path.exists(os.path.join(base, path)) for base in (ROOT, os.path.dirname(document)))


class CitedFilesTests(SynchronousTestCase):
    def test_every_cited_file_exists(self):
        missing = []
        for document in documents():
            with open(document, encoding="utf-8") as f:
                text = f.read()
            for path in sorted(cited(text)):
                if path.startswith("/") or path.startswith("~"):
                    continue  # a path on the machine the broker runs on (/var/lib/zaichik)
                if not exists(path, document):
                    missing.append(f"{os.path.relpath(document, ROOT)}: {path}")
        self.assertEqual(missing, [])

    def test_the_checker_finds_paths(self):
        """The pattern itself: what it must see, and what it must leave alone."""
        text = ("see ``zaichik/storage/disk.py`` and `docs/storage.rst <docs/storage.rst>`_, "
                "``../shared/spec/protocol-v1.md``, benchmarks/ and setup.py; not /var/lib/zaichik, "
                "pub/sub, I/O, sensors/temp, https://example.com/x.md, 60s or key.pem")
        self.assertEqual(cited(text), {"zaichik/storage/disk.py", "docs/storage.rst",
                                       "../shared/spec/protocol-v1.md", "benchmarks/", "setup.py"})


class TestCommandTests(SynchronousTestCase):
    COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install '.[test]' && python -m pytest"

    def test_readme_and_ci_run_the_same_test_command(self):
        with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
            readme = f.read()
        with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
            ci = f.read()
        self.assertIn(self.COMMAND, readme)
        self.assertIn(self.COMMAND, ci)
