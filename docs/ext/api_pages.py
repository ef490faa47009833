"""Sphinx extension: the API reference's pages, written from the package at the start of every build.

One page per public module, ``docs/api/<module>.rst``: the module's docstring, a summary of its ``__all__``, and an
autodoc entry for each name it defines; the names it re-exports (a package face) are listed with links to the
module that documents them, so that each object is described once. ``docs/api/index.rst`` lists the modules.
The pages follow the code: ``docs/api/`` is generated (and ignored by git); edit the docstrings, not the pages.

References to a re-exported name (``jaxdiff.q_sample``, or ``ddim_sample`` written in the samplers' face) resolve to
the entry at its home.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import public_api
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

_SECTIONS = (
    ("class", "Classes", "autoclass"),
    ("function", "Functions", "autofunction"),
    ("data", "Constants", "autodata"),
)
_OPTIONS = {"autoclass": ["   :members:"]}


def _title(text: str, underline: str = "=") -> list[str]:
    return [text, underline * len(text), ""]


def summary(doc: str) -> str:
    """The first paragraph of a docstring, on one line (nothing when it opens with a directive or a section)."""
    first = doc.strip().split("\n\n", 1)[0].strip()
    if not first or first.startswith("..") or first.rstrip().endswith(":"):
        return ""
    return " ".join(line.strip() for line in first.splitlines())


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 30 70", "   :width: 100%", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    return [*lines, ""]


def module_page(module: public_api.ModuleApi) -> str:
    """The reStructuredText of one module's page."""
    lines = [*_title(module.name), f".. automodule:: {module.name}", ""]
    if module.exports is None:
        lines += [".. warning:: This module has no ``__all__``: its public names are not known.", ""]
    if module.defined:
        rows = [(f":py:obj:`~{e.target}`", summary(e.doc)) for e in module.defined]
        lines += [*_title("Summary", "-"), *_table(rows, ("name", "what it is"))]
    for kind, heading, directive in _SECTIONS:
        entries = [e for e in module.defined if e.kind == kind]
        if entries:
            lines += _title(heading, "-")
            for entry in entries:
                lines += [f".. {directive}:: {entry.target}", *_OPTIONS.get(directive, []), ""]
    if module.reexported:
        rows = [_reexport_row(e) for e in module.reexported]
        lines += [
            *_title("Re-exported names", "-"),
            f"``{module.name}`` re-exports these names; each is documented in the module that defines it.",
            "",
            *_table(rows, ("name", "what it is")),
        ]
    return "\n".join(lines)


def _reexport_row(entry: public_api.Entry) -> tuple[str, str]:
    if entry.kind == "module":
        return (f":py:mod:`{entry.name} <{entry.home}>`", " ".join(filter(None, ["A module.", summary(entry.doc)])))
    where = f"From :py:mod:`{entry.home}`."
    return (f":py:obj:`{entry.name} <{entry.target}>`", " ".join(filter(None, [where, summary(entry.doc)])))


def index_page(api: public_api.Api) -> str:
    """The reStructuredText of the API reference's front page."""
    lines = [
        *_title("API reference"),
        f"Every public module of ``{api.package}``, one page each, generated from the docstrings at each build. A name",
        "is documented once, in the module that defines it; a package face (``jaxdiff``, ``jaxdiff.samplers``, ...)",
        "lists the names it re-exports with links there, and a reference to a re-exported name",
        "(``jaxdiff.q_sample``) leads to the same entry. Modules kept only so that old import paths keep working are",
        "left out.",
        "",
        *_table([(f":py:mod:`{m.name}`", summary(m.doc)) for m in api.modules], ("module", "what it holds")),
        ".. toctree::",
        "   :hidden:",
        "",
        *[f"   {m.name}" for m in api.modules],
        "",
    ]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    """Write only when the text changes, so that Sphinx re-reads only the pages that did."""
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def write_pages(app: Sphinx) -> dict[str, str]:
    """Write the pages for ``app.config.api_package`` and remove stale ones; return the re-exported names' aliases."""
    api = public_api.read_api(app.config.api_package)
    folder = Path(app.srcdir) / app.config.api_dir
    folder.mkdir(exist_ok=True)
    pages = {f"{m.name}.rst": module_page(m) for m in api.modules}
    pages["index.rst"] = index_page(api)
    for stale in set(p.name for p in folder.glob("*.rst")) - set(pages):
        (folder / stale).unlink()
    for name, text in pages.items():
        _write(folder / name, text)
    logger.info(f"[api_pages] {len(api.modules)} module pages in {folder}")
    return api.aliases()


def resolve_alias(app: Sphinx, env, node: nodes.Element, contnode: nodes.Element, aliases: dict[str, str]):
    """A reference to a re-exported name, resolved to its home's entry (None: not one of ours)."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    module = node.get("py:module")
    candidates = [f"{module}.{target}", target] if module else [target]
    for candidate in candidates:
        if candidate in aliases:
            domain = env.get_domain("py")
            return domain.resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], aliases[candidate], node, contnode
            )
    return None


def skip_field_aliases(app: Sphinx, what: str, name: str, obj: object, skip: bool, options) -> bool | None:
    """Leave out a named tuple's fields as members: their only docstring is the generated "Alias for field number N",
    and the class's Attributes section (napoleon) documents them, under the same names."""
    if what == "class" and (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def drop_type_docstrings(app: Sphinx, what: str, name: str, obj: object, options, lines: list[str]) -> None:
    """A constant without a doc comment gets its type's docstring from autodoc (``dict()`` -> new empty dictionary):
    that is no documentation of the constant, so drop it (the coverage check reports the missing doc comment)."""
    if what in ("data", "attribute") and not inspect.isclass(obj) and not inspect.isroutine(obj) and lines:
        if "\n".join(lines).strip() == (inspect.getdoc(type(obj)) or "").strip():
            lines.clear()


def setup(app: Sphinx) -> dict:
    app.add_config_value("api_package", "jaxdiff", "env")
    app.add_config_value("api_dir", "api", "env")
    aliases: dict[str, str] = {}
    app.connect("builder-inited", lambda app: aliases.update(write_pages(app)))
    app.connect("missing-reference", lambda app, env, node, contnode: resolve_alias(app, env, node, contnode, aliases))
    app.connect("autodoc-skip-member", skip_field_aliases)
    app.connect("autodoc-process-docstring", drop_type_docstrings)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
