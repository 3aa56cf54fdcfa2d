"""README.rst renders without errors and keeps its two set-up commands."""

from __future__ import annotations

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
    assert (
        command in (ROOT / ".ci" / "run").read_text() or "test-command" in (ROOT / ".ci" / "run").read_text()
    )
