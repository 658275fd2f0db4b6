"""README.rst is the user's manual: it must render without a warning (broken markup hides text)."""

from __future__ import annotations

import io
import re

import docutils.core
from helpers import ROOT


def test_readme_renders_without_warnings() -> None:
    errors = io.StringIO()
    docutils.core.publish_string(
        (ROOT / "README.rst").read_text(),
        writer="null",
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": errors},
    )
    assert errors.getvalue() == ""


def test_links_to_files_of_the_repository_resolve() -> None:
    text = (ROOT / "README.rst").read_text()
    targets = re.findall(r"<((?:conf|scripts|tests)/[^>]+)>`_", text)
    assert targets
    for target in targets:
        assert (ROOT / target).exists(), target
