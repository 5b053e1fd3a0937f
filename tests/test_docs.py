"""The API reference pages cover every public name, and only names that exist; the built site
works offline and renders docstrings as intended.

``mkdocs build --strict`` (run by ``make docs`` in CI) catches broken references and docstrings;
these tests catch a public name that was exported but never put on an API page, a page that
loads anything from the network (MathJax included), docstring examples that do not render as
code, and signatures left on one line.
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

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


# --- The built site: offline math, examples as code, formatted signatures -----------------------
# One ``mkdocs build`` (a few seconds) into a temporary directory, inspected by the tests below.
# Without the docs extra they skip, except where DISCRETELIK_REQUIRE_DOCS=1 (set by .ci/run).

MATHJAX = "assets/mathjax/tex-mml-chtml.js"


def _mkdocs() -> None:
    if os.environ.get("DISCRETELIK_REQUIRE_DOCS"):
        import mkdocs  # noqa: F401  (an ImportError here fails the test: CI needs the docs extra)
    else:
        pytest.importorskip("mkdocs", reason="the docs extra is not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _mkdocs()
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build failed:\n{proc.stdout}\n{proc.stderr}"
    return out


class _Resources(HTMLParser):
    """Collects the URLs a page makes the browser load (not the links a reader may follow)."""

    LOADS = {"script": "src", "img": "src", "iframe": "src", "source": "src", "embed": "src",
             "audio": "src", "video": "src", "object": "data", "link": "href"}

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "link" and not {"stylesheet", "preload", "preconnect", "modulepreload",
                                  "dns-prefetch", "icon"} & set((attr.get("rel") or "").split()):
            return  # rel="next"/"prev"/"canonical": navigation, nothing is fetched
        url = attr.get(self.LOADS.get(tag, ""))
        if url:
            self.urls.append(url)
            if tag == "script":
                self.scripts.append(url)


def _remote(url: str) -> bool:
    return bool(re.match(r"^([a-z][a-z0-9+.-]*:)?//", url.strip(), flags=re.I))


def _pages(site: Path) -> list[Path]:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10, f"the built site has only {len(pages)} pages"
    return pages


def test_site_loads_nothing_from_the_network(site: Path) -> None:
    remote = []
    for page in _pages(site):
        parser = _Resources()
        parser.feed(page.read_text(encoding="utf-8"))
        remote += [f"{page.relative_to(site)}: {u}" for u in parser.urls if _remote(u)]
    for css in site.rglob("*.css"):
        for url in re.findall(r"(?:url\(|@import)\s*['\"]?([^'\")\s;]+)", css.read_text("utf-8")):
            if _remote(url):
                remote.append(f"{css.relative_to(site)}: {url}")
    assert not remote, "the site loads remote resources (it must work offline):\n" + "\n".join(
        remote
    )


def test_formula_pages_load_mathjax_from_the_site(site: Path) -> None:
    assert (site / MATHJAX).stat().st_size > 100_000, "MathJax's combined component is missing"
    fonts = list((site / "assets/mathjax/output/chtml/fonts/woff-v2").glob("*.woff"))
    assert len(fonts) > 10, f"MathJax's CHTML fonts are missing ({len(fonts)} found)"
    assert list((site / "assets/mathjax/input/tex/extensions").glob("*.js")), (
        "MathJax's on-demand TeX extensions are missing"
    )
    with_math = 0
    for page in _pages(site):
        text = page.read_text(encoding="utf-8")
        if 'class="arithmatex"' not in text:
            continue
        with_math += 1
        parser = _Resources()
        parser.feed(text)
        loaded = [(page.parent / s).resolve() for s in parser.scripts if not _remote(s)]
        mathjax = (site / MATHJAX).resolve()
        config = (site / "javascripts/mathjax.js").resolve()
        assert mathjax in loaded, f"{page.relative_to(site)} has formulas but loads no MathJax"
        assert config in loaded and loaded.index(config) < loaded.index(mathjax), (
            f"{page.relative_to(site)}: the MathJax configuration must load before MathJax"
        )
    assert with_math >= 3, f"only {with_math} pages with formulas: the check tests nothing"


def test_docstring_examples_render_as_code(site: Path) -> None:
    # "Example:" (the spelling the docstrings use) must become a code block of the >>> session,
    # not an admonition whose >>> lines Markdown reads as nested block quotes.
    page = (site / "api/model/index.html").read_text(encoding="utf-8")
    assert "<blockquote>" not in page and 'class="example"' not in page
    code = re.findall(r'<div class="highlight"><pre>.*?</pre>', page, flags=re.S)
    session = [c for c in code if "&gt;&gt;&gt; </span>" in c and "build" in c]
    assert session, "build's Example section is not rendered as a code block"
    for api in (site / "api").rglob("*.html"):
        text = api.read_text(encoding="utf-8")
        assert "<blockquote>" not in text, f"{api.relative_to(site)} renders a block quote"


def test_long_signatures_are_formatted(site: Path) -> None:
    page = (site / "api/model/index.html").read_text(encoding="utf-8")
    signatures = [
        html.unescape(re.sub(r"<[^>]+>", "", s))
        for s in re.findall(r'<div class="doc-signature highlight"><pre>(.*?)</pre>', page, re.S)
    ]
    build = [s for s in signatures if s.startswith("build(")]
    assert build, "no signature of build on the model page"
    # One parameter per line: the formatter (Ruff, from the docs extra) ran.
    assert "\n    backbone: str,\n" in build[0], build[0]


def test_mathjax_hook_names_the_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _mkdocs()
    path = ROOT / "hooks" / "mathjax_assets.py"
    spec = importlib.util.spec_from_file_location("mathjax_assets", path)
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    assert (hook.mathjax_root() / hook.ENTRY).is_file()

    def missing(name: str) -> None:
        raise hook.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(hook.metadata, "distribution", missing)
    with pytest.raises(hook.PluginError, match="install the docs extra"):
        hook.mathjax_root()
