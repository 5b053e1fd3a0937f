"""The API reference pages cover every public name, and only names that exist.

``mkdocs build --strict`` (run by ``make docs`` in CI) catches broken references and docstrings;
this test catches a public name that was exported but never put on an API page.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
# Public namespaces whose ``__all__`` must be documented, with the prefix the pages use.
NAMESPACES = (
    "discretelik",
    "discretelik.testing",
    "discretelik.data",
    "discretelik.nn",
    "discretelik.train",
)


def documented() -> set[str]:
    names = set()
    for page in API.glob("*.md"):
        names |= set(re.findall(r"^::: *([\w.]+)", page.read_text(), flags=re.M))
    return names


def exported() -> set[str]:
    names = set()
    for ns in NAMESPACES:
        try:
            mod = importlib.import_module(ns)
        except ModuleNotFoundError as err:  # a namespace that does not exist (yet)
            if err.name != ns:
                raise
            continue
        names |= {f"{ns}.{n}" for n in getattr(mod, "__all__", ())}
    return names


def test_every_public_name_has_an_api_entry() -> None:
    missing = sorted(exported() - documented())
    assert not missing, f"public names missing from docs/api/*.md: {missing}"


def test_api_entries_are_exported_names() -> None:
    stale = sorted(documented() - exported())
    assert not stale, f"docs/api/*.md document names that are not exported: {stale}"
