"""Check the built documentation site in a real browser: headless Chromium against a local HTTP server.

    python docs/check_site.py [--site docs/_build/html] [--screenshots docs/_build/screenshots]

Build the site first (``python -m sphinx -W --keep-going -b html docs docs/_build/html``). The check

1. reads every HTML page of the site and fails on an internal link (``href``/``src`` to the same site) whose file or
   ``#anchor`` does not exist;
2. opens the front page, the math pages, an API page with equations (``jaxdiff.diffusion``'s, or the first that has
   any) and a notebook in Chromium, and fails on a console error, an uncaught exception, a request that fails or that
   leaves the local server (a CDN), an image that does not load, math that MathJax did not typeset (raw ``\\(``,
   ``\\[``, ``$$`` or ``$\\command`` left in the text, or a TeX error), and on the notebook page, on no output images;
3. saves a full-page screenshot of each opened page.

The notebooks' images are there only once the notebooks are stored with their outputs: until then the check fails
on them with a message that says so; ``--allow-missing-outputs`` makes that a note. Chromium is Debian's
(``apt-get install chromium``), driven over the DevTools protocol by Playwright (``pip install -e '.[docs]'``), which
downloads no browser of its own.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import re
import sys
import threading
import time
import urllib.parse
from pathlib import Path

DOCS = Path(__file__).resolve().parent
EXTERNAL = ("http:", "https:", "mailto:", "javascript:", "data:", "tel:", "ftp:")
DEFAULT_NOTEBOOK = "notebooks/02_train_digits.html"
DEFAULT_API_PAGE = "api/jaxdiff.diffusion.html"
MATH_PAGES = ("the_math.html", "conventions.html")

# Raw TeX in a page's text (code blocks and typeset math left out): delimiters MathJax should have consumed, or a
# dollar-delimited TeX command that MyST did not turn into math.
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\$[^$\n]{0,80}\\[A-Za-z]+[^$\n]{0,80}\$")

# The page's text without code, scripts and typeset math; and what MathJax made of the page's math elements.
_PAGE_STATE = """() => {
  const body = document.body.cloneNode(true);
  body.querySelectorAll('pre, code, script, style, textarea, mjx-container, .highlight').forEach(e => e.remove());
  const math = [...document.querySelectorAll('.math')];
  const images = [...document.images];
  return {
    text: body.textContent,
    math: math.length,
    typeset: math.filter(e => e.querySelector('mjx-container') || e.tagName === 'MJX-CONTAINER').length,
    tex_errors: document.querySelectorAll('mjx-merror').length,
    broken_images: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    output_images: [...document.querySelectorAll('.cell_output img')].filter(i => i.naturalWidth > 0).length,
  };
}"""
_MATHJAX_DONE = "() => window.MathJax && MathJax.startup ? MathJax.startup.promise.then(() => true) : false"


class _Links(html.parser.HTMLParser):
    """The anchors (``id``/``name``) a page defines and the links (``href``/``src``) it makes."""

    def __init__(self):
        super().__init__()
        self.anchors: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name") if tag != "meta" else ():
            if attrs.get(key):
                self.anchors.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) is not None:
                self.links.append(attrs[key])


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser


def site_pages(site: Path) -> list[Path]:
    """The site's HTML pages (not the theme's HTML templates under ``_static/``)."""
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)


def broken_links(site: Path) -> list[str]:
    """Every internal link of every page whose file or anchor is missing, as 'page: link (why)'."""
    pages = {p: _parse(p) for p in site_pages(site)}
    problems = []
    for page, parsed in pages.items():
        for link in parsed.links:
            if not link or link.startswith(EXTERNAL) or link.startswith("//"):
                continue
            url = urllib.parse.urlsplit(link)
            target = page if not url.path else (page.parent / urllib.parse.unquote(url.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            name = page.relative_to(site)
            if not target.is_relative_to(site):
                problems.append(f"{name}: {link} (outside the site)")
            elif not target.exists():
                problems.append(f"{name}: {link} (no such file)")
            elif url.fragment and target.suffix == ".html":
                anchors = pages[target].anchors if target in pages else _parse(target).anchors
                if urllib.parse.unquote(url.fragment) not in anchors:
                    problems.append(f"{name}: {link} (no such anchor)")
    return problems


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A local HTTP server of ``site`` on a free port of 127.0.0.1, in a thread; and its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def api_page_with_math(site: Path, preferred: str) -> str | None:
    """``preferred`` if its page has equations, else the first API page that has any (None: no API page has)."""
    candidates = [site / preferred, *sorted((site / "api").glob("*.html"))]
    for page in candidates:
        if page.exists() and 'class="math' in page.read_text(encoding="utf-8", errors="replace"):
            return str(page.relative_to(site))
    return None


def check_page(browser, base: str, page_name: str, shots: Path, *, math: bool, outputs: bool) -> tuple[list, list]:
    """Open one page; return (problems, notes) and save its screenshot."""
    problems, notes = [], []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught exception: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.on("request", lambda r: None if r.url.startswith((base, "data:")) else problems.append(f"external: {r.url}"))
    page.goto(base + page_name, wait_until="networkidle")
    page.evaluate(_MATHJAX_DONE)
    page.wait_for_load_state("networkidle")  # fonts MathJax asked for while typesetting
    state = page.evaluate(_PAGE_STATE)
    raw = sorted({m.group(0)[:60] for m in RAW_TEX.finditer(state["text"])})
    if raw:
        problems.append(f"raw TeX left in the text: {raw[:5]}")
    if state["tex_errors"]:
        problems.append(f"{state['tex_errors']} TeX error(s) in MathJax's output")
    if state["typeset"] < state["math"]:
        problems.append(f"MathJax typeset {state['typeset']} of {state['math']} math elements")
    if math and not state["math"]:
        problems.append("no math on the page (expected equations)")
    if state["broken_images"]:
        problems.append(f"images that did not load: {state['broken_images'][:5]}")
    if outputs and not state["output_images"]:
        problems.append(
            "no output images: the notebook is stored without outputs (they come with a full run of the notebooks;"
            " meanwhile build from an executed copy with -D notebooks_source=DIR, or pass --allow-missing-outputs)"
        )
    notes.append(f"{state['typeset']} of {state['math']} math elements typeset" if state["math"] else "no math")
    if outputs:
        notes.append(f"{state['output_images']} output images")
    shot = shots / (page_name.replace("/", "_").removesuffix(".html") + ".png")
    page.screenshot(path=str(shot), full_page=True)
    notes.append(f"screenshot {shot}")
    page.close()
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--site", type=Path, default=DOCS / "_build" / "html", help="the built site")
    parser.add_argument("--screenshots", type=Path, default=DOCS / "_build" / "screenshots", help="where they go")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (Debian's chromium)")
    parser.add_argument("--notebook", default=DEFAULT_NOTEBOOK, help="the notebook page whose images are checked")
    parser.add_argument("--api-page", default=DEFAULT_API_PAGE, help="the API page preferred for the math check")
    parser.add_argument("--allow-missing-outputs", action="store_true", help="notebook pages without images: a note")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright  # the docs extra

    start = time.perf_counter()
    site = args.site.resolve()
    if not (site / "index.html").exists():
        print(f"no site at {site}: build it first (python -m sphinx -W --keep-going -b html docs {args.site})")
        return 2
    args.screenshots.mkdir(parents=True, exist_ok=True)
    failures = 0
    links = broken_links(site)
    pages_count = len(site_pages(site))
    print(f"{'FAIL' if links else 'ok  '} internal links of {pages_count} pages" + "".join(f"\n  {p}" for p in links))
    failures += bool(links)

    api_page = api_page_with_math(site, args.api_page)
    plan = [("index.html", False, False), *((p, True, False) for p in MATH_PAGES)]
    plan += [(api_page, True, False)] if api_page else []
    plan += [(args.notebook, True, True)]
    if api_page is None:
        print("FAIL no API page has equations (the docstrings' .. math:: blocks)")
        failures += 1
    server, base = serve(site)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            for name, math, outputs in plan:
                problems, notes = check_page(browser, base, name, args.screenshots, math=math, outputs=outputs)
                if outputs and args.allow_missing_outputs:
                    missing = [p for p in problems if p.startswith("no output images")]
                    problems = [p for p in problems if p not in missing]
                    notes += ["NOTE: " + p for p in missing]
                print(f"{'FAIL' if problems else 'ok  '} {name}: {'; '.join(notes)}")
                print("".join(f"  {p}\n" for p in problems), end="")
                failures += bool(problems)
            browser.close()
    finally:
        server.shutdown()
    verdict = f"{failures} check(s) failed" if failures else "all checks passed"
    print(f"{verdict}, in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
