"""MkDocs hook: serve MathJax from the site itself, so formulas render without a network.

MathJax comes from the ``django-static-mathjax`` wheel (a plain copy of the MathJax 3 release,
no Django needed to read it), installed by the ``docs`` extra. Its ``es5`` tree is added to the
site under ``assets/mathjax/``; ``mkdocs.yml`` loads ``assets/mathjax/tex-mml-chtml.js``, and
MathJax finds its fonts and on-demand TeX extensions relative to that script.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

DISTRIBUTION = "django-static-mathjax"
DEST = "assets/mathjax"
# The one combined component the site loads; the other combined bundles in es5/ (SVG output,
# MathML-only input, the Node.js entry) are never requested by it, so they are not shipped.
ENTRY = "tex-mml-chtml.js"


def mathjax_root() -> Path:
    """The installed MathJax ``es5`` directory; a clear error when the docs extra is missing."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise PluginError(
            f"{DISTRIBUTION} is not installed: the docs serve MathJax from the site; "
            "install the docs extra (pip install -e '.[docs]', or make docs)"
        ) from None
    root = Path(str(dist.locate_file("mathjax/static/mathjax/es5")))
    if not (root / ENTRY).is_file():
        raise PluginError(f"{DISTRIBUTION} {dist.version} has no es5/{ENTRY} under {root}")
    return root


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = mathjax_root()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_dir() or (len(rel.parts) == 1 and rel.name != ENTRY):
            continue
        files.append(File.generated(config, f"{DEST}/{rel.as_posix()}", abs_src_path=str(path)))
    return files
