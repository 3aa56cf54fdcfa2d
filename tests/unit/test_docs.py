"""README.rst renders without errors, keeps its two set-up commands and lists the
reference pages of docs/ that the Sphinx site links."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import docutils.core

ROOT = Path(__file__).resolve().parents[2]


def test_readme_renders_cleanly() -> None:
    # halt_level 2: any warning (a malformed table, a broken reference) raises.
    docutils.core.publish_doctree(
        (ROOT / "README.rst").read_text(),
        settings_overrides={"halt_level": 2, "report_level": 5},
    )


def test_readme_gives_the_demo_and_test_commands() -> None:
    text = (ROOT / "README.rst").read_text()
    # The front page: the pitch, then at once the two commands, before installation and usage.
    assert text.index(".venv/bin/python -m example_project demo") < text.index("\nInstallation\n====")
    marker = text.index(".. test-command")
    command = next(line.strip() for line in text[marker:].splitlines()[1:] if line.startswith("    "))
    assert command.endswith(".venv/bin/python -m pytest")
    # .ci/run's own extraction, run on the README, finds exactly that command, and .ci/run runs it.
    ci = (ROOT / ".ci" / "run").read_text()
    [extraction] = re.findall(r"^test_command=\$\((.*)\)$", ci, re.MULTILINE)
    found = subprocess.run(["bash", "-c", extraction], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout == command + "\n"
    assert re.search(r'^bash -c "\$test_command"$', ci, re.MULTILINE)


def test_readme_lists_the_pages_that_the_site_links() -> None:
    # README names the pages as plain paths (PyPI would render links to them
    # broken); docs/index.rst links the same pages, in the same order, instead.
    readme = (ROOT / "README.rst").read_text()
    listed = re.findall(r"^\* docs/([\w-]+)\.rst", readme[readme.index(".. reference-pages") :], re.MULTILINE)
    index = (ROOT / "docs" / "index.rst").read_text()
    toctree = re.findall(r"^   ([\w-]+)$", index[index.index(".. toctree::") :], re.MULTILINE)
    assert listed == [page for page in toctree if page != "changelog"]


def test_the_package_points_to_pages_that_exist() -> None:
    sources = "".join(path.read_text() for path in (ROOT / "celery_unique").rglob("*.py"))
    named = set(re.findall(r"docs/[\w-]+\.rst", sources))
    assert named and all((ROOT / page).is_file() for page in named), named
