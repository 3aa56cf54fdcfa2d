"""README.rst renders without errors and keeps its two set-up commands."""

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
    assert ".venv/bin/python -m example_project demo" in text
    marker = text.index(".. test-command")
    command = next(line.strip() for line in text[marker:].splitlines()[1:] if line.startswith("    "))
    assert command.endswith(".venv/bin/python -m pytest")
    # .ci/run's own extraction, run on the README, finds exactly that command, and .ci/run runs it.
    ci = (ROOT / ".ci" / "run").read_text()
    [extraction] = re.findall(r"^test_command=\$\((.*)\)$", ci, re.MULTILINE)
    found = subprocess.run(["bash", "-c", extraction], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout == command + "\n"
    assert re.search(r'^bash -c "\$test_command"$', ci, re.MULTILINE)
