"""Griffe extension: a Google-style ``Example:`` section is an examples section.

Griffe knows only the plural ``Examples:``; it renders the singular as an admonition whose
``>>>`` lines Markdown reads as nested block quotes, with the code run together. Napoleon and
the Google style guide accept both spellings, and the docstrings use the singular, so the
section title is normalised here, before the docstring is parsed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.M)


class SingularExamples(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
