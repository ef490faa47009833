"""What a package promises: its public modules, the names each lists in ``__all__``, and where each is documented.

Plain Python (no Sphinx): the API pages (``api_pages.py``) and the coverage check (``coverage_check.py``) both read
it, and ``tests/test_docs.py`` runs it on a toy package.

A module is public when no part of its dotted name starts with ``_`` and it is not an alias kept only for old import
paths (the keys of ``<package>._moved.MODULES``, when that module exists). Each public name is documented once, at
its *home*: the module that defines it (a ``def``, a ``class`` or an assignment at its top level), found by
following the ``from ... import`` statements of the modules that re-export it. A module that only re-exports a name
(a package face such as ``jaxdiff.samplers``) links to the home.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import pkgutil
import tokenize
import types
from collections.abc import Collection
from pathlib import Path

KINDS = ("module", "class", "function", "data")


@dataclasses.dataclass(frozen=True)
class Definition:
    """A name bound at a module's top level by ``def``, ``class`` or an assignment, with its documentation."""

    kind: str  # "class", "function" or "data"
    doc: str  # the docstring, or for data its doc comment ("#:" above or beside it, or a string below it); "" if none
    line: int = 0  # where it is bound in the module's source


@dataclasses.dataclass(frozen=True)
class Entry:
    """One name of a module's ``__all__`` and where the site documents it."""

    name: str  # as the module exports it
    home: str  # the module whose page documents it (for a module object: that module itself)
    home_name: str  # its name there (the same unless re-exported under another name)
    kind: str  # one of KINDS
    doc: str

    @property
    def target(self) -> str:
        """The dotted name the site documents it under."""
        return self.home if self.kind == "module" else f"{self.home}.{self.home_name}"


@dataclasses.dataclass(frozen=True)
class ModuleApi:
    """A public module: its docstring, its ``__all__`` (None when it has none) and an entry per exported name."""

    name: str
    doc: str
    exports: tuple[str, ...] | None
    entries: tuple[Entry, ...]

    @property
    def defined(self) -> tuple[Entry, ...]:
        """The entries this module's page documents."""
        return tuple(e for e in self.entries if e.kind != "module" and e.home == self.name)

    @property
    def reexported(self) -> tuple[Entry, ...]:
        """The entries documented elsewhere, which this module's page links to."""
        return tuple(e for e in self.entries if e.kind == "module" or e.home != self.name)


@dataclasses.dataclass(frozen=True)
class Api:
    """A package's public modules, and the problems met while reading them (each one line, naming the module)."""

    package: str
    modules: tuple[ModuleApi, ...]
    problems: tuple[str, ...]

    def aliases(self) -> dict[str, str]:
        """Each re-exported dotted name (``jaxdiff.q_sample``) -> the name it is documented under."""
        return {f"{m.name}.{e.name}": e.target for m in self.modules for e in m.reexported if e.kind != "module"}


def alias_modules(package: str) -> frozenset[str]:
    """The modules kept only as aliases of moved ones: the keys of ``<package>._moved.MODULES`` (none without it)."""
    try:
        moved = importlib.import_module(f"{package}._moved")
    except ModuleNotFoundError as error:
        if error.name in (f"{package}._moved", package):
            return frozenset()
        raise
    return frozenset(getattr(moved, "MODULES", {}))


def _is_private(name: str) -> bool:
    return any(part.startswith("_") for part in name.split("."))


def _raise(name: str) -> None:
    raise ImportError(f"could not import {name} while walking the package")


def public_module_names(package: str) -> list[str]:
    """The package and every public module under it, sorted (the package first)."""
    aliases = alias_modules(package)
    root = importlib.import_module(package)
    found = [package]
    if hasattr(root, "__path__"):
        found += [info.name for info in pkgutil.walk_packages(root.__path__, f"{package}.", onerror=_raise)]

    def public(name: str) -> bool:
        return not _is_private(name) and not any(name == a or name.startswith(f"{a}.") for a in aliases)

    return sorted(filter(public, found))


def _comments(source: str) -> dict[int, tuple[int, str]]:
    """Line number -> (column, text) of each comment in ``source``."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = (token.start[1], token.string)
    return found


def _doc_comment(node: ast.stmt, lines: list[str], comments: dict[int, tuple[int, str]]) -> str:
    """The ``#:`` doc comment of an assignment: the block of ``#:`` lines right above it, else one beside it."""
    above = []
    line = node.lineno - 1
    while line >= 1 and line in comments and not lines[line - 1][: comments[line][0]].strip():
        text = comments[line][1]
        if not text.startswith("#:"):
            break
        above.insert(0, text[2:].strip())
        line -= 1
    if above:
        return "\n".join(above).strip()
    text = comments.get(node.lineno, (0, ""))[1]
    if text.startswith("#:") and node.end_lineno == node.lineno:
        return text[2:].strip()
    return ""


def _string_after(body: list[ast.stmt], index: int) -> str:
    """The docstring an assignment can have: a string literal as the statement right after it."""
    if index + 1 < len(body):
        after = body[index + 1]
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            return inspect.cleandoc(after.value.value)
    return ""


def _assigned_names(node: ast.stmt) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _blocks(node: ast.stmt) -> list[list[ast.stmt]]:
    """The statement lists inside a top-level ``if`` or ``try`` (definitions there are still the module's)."""
    if isinstance(node, ast.If):
        return [node.body, node.orelse]
    if isinstance(node, ast.Try):
        return [node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)]
    return []


def top_level(source: str) -> tuple[dict[str, Definition], dict[str, tuple[str, int, str]]]:
    """What a module's source binds at its top level.

    Returns:
      (definitions, imports): name -> :class:`Definition` for each ``def``, ``class`` and assigned name, and
      name -> (module, level, original name) for each ``from module import original as name``.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    comments = _comments(source)
    definitions: dict[str, Definition] = {}
    imports: dict[str, tuple[str, int, str]] = {}

    def visit(body: list[ast.stmt]) -> None:
        for index, node in enumerate(body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                definitions[node.name] = Definition(kind, ast.get_docstring(node) or "", node.lineno)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                doc = _doc_comment(node, lines, comments) or _string_after(body, index)
                for name in _assigned_names(node):
                    definitions[name] = Definition("data", doc, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    imports[alias.asname or alias.name] = (node.module or "", node.level, alias.name)
            for block in _blocks(node):
                visit(block)

    visit(tree.body)
    return definitions, imports


def _absolute(module: str, level: int, importer: str, importer_is_package: bool) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in module ``importer``."""
    if level == 0:
        return module
    parts = importer.split(".")
    base = parts if importer_is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


class _Reader:
    """Reads modules once each: their objects, top-level definitions and imports."""

    def __init__(self, package: str, public: Collection[str]):
        self.package = package
        self.public = set(public)
        self._parsed: dict[str, tuple[dict[str, Definition], dict[str, tuple[str, int, str]]]] = {}

    def module(self, name: str) -> types.ModuleType:
        return importlib.import_module(name)

    def parsed(self, name: str):
        if name not in self._parsed:
            path = getattr(self.module(name), "__file__", None)
            source = Path(path).read_text(encoding="utf-8") if path and path.endswith(".py") else ""
            self._parsed[name] = top_level(source)
        return self._parsed[name]

    def _inside(self, name: str) -> bool:
        return name == self.package or name.startswith(f"{self.package}.")

    def chain(self, module: str, name: str, obj: object) -> tuple[list[tuple[str, str]], Definition | None]:
        """The (module, name) hops from ``module.name`` to where it is defined, and its definition there (None when
        the trail leaves the package or the source does not show it).

        Follows ``from ... import`` statements; a name without one (bound lazily, by ``__getattr__``) is looked for
        where its object says it was defined (``__module__``), else in the one public module that defines the same
        object.
        """
        hops, seen = [(module, name)], {module}
        while True:
            current, wanted = hops[-1]
            definitions, imports = self.parsed(current)
            if wanted in definitions:
                return hops, definitions[wanted]
            if wanted in imports:
                base, level, wanted = imports[wanted]
                source = _absolute(base, level, current, hasattr(self.module(current), "__path__"))
            else:
                source = self._guess(current, wanted, obj)
            if source is None or not self._inside(source) or source in seen:
                return hops, None
            hops.append((source, wanted))
            seen.add(source)

    def _guess(self, current: str, name: str, obj: object) -> str | None:
        owner = getattr(obj, "__module__", None)
        if isinstance(owner, str) and owner != current and self._inside(owner):
            return owner
        matches = [
            m
            for m in sorted(self.public)
            if m != current and name in self.parsed(m)[0] and getattr(self.module(m), name, None) is obj
        ]
        return matches[0] if len(matches) == 1 else None


def _kind_of(obj: object) -> str:
    if inspect.isclass(obj):
        return "class"
    if inspect.isroutine(obj):
        return "function"
    return "data"


def read_api(package: str) -> Api:
    """Read every public module of ``package`` (importing them) and decide each exported name's home."""
    names = public_module_names(package)
    reader = _Reader(package, names)
    modules, problems = [], []
    for name in names:
        module = reader.module(name)
        exports = getattr(module, "__all__", None)
        doc = inspect.cleandoc(module.__doc__ or "")
        if exports is None:
            problems.append(f"{name}: the module has no __all__ (a public module lists its public names)")
            modules.append(ModuleApi(name, doc, None, ()))
            continue
        exports = tuple(exports)
        duplicates = sorted({n for n in exports if exports.count(n) > 1})
        if duplicates:
            problems.append(f"{name}: __all__ lists {', '.join(duplicates)} more than once")
        entries = []
        for export in dict.fromkeys(exports):
            if not hasattr(module, export):
                problems.append(f"{name}: __all__ lists {export!r}, which the module does not have")
                continue
            entry, problem = _entry(reader, name, export, getattr(module, export))
            entries.append(entry)
            if problem:
                problems.append(problem)
        modules.append(ModuleApi(name, doc, exports, tuple(entries)))
    return Api(package, tuple(modules), tuple(problems))


def _entry(reader: _Reader, module: str, name: str, obj: object) -> tuple[Entry, str | None]:
    """The entry of ``module.name`` (bound to ``obj``), and a problem with it, if any."""
    if inspect.ismodule(obj):
        problem = None if obj.__name__ in reader.public else f"{module}: __all__ lists {name!r}, a module not public"
        return Entry(name, obj.__name__, obj.__name__, "module", inspect.cleandoc(obj.__doc__ or "")), problem
    hops, definition = reader.chain(module, name, obj)
    public_hops = [hop for hop in hops if hop[0] in reader.public]
    # Documented where it is defined; when that module is private (or outside the package), at the last public
    # module on the way there.
    home, home_name = hops[-1] if hops[-1][0] in reader.public else public_hops[-1]
    if definition is None:
        kind = _kind_of(obj)
        doc = inspect.cleandoc(obj.__doc__ or "") if kind != "data" else ""
        return Entry(name, home, home_name, kind, doc), None
    entry = Entry(name, home, home_name, definition.kind, definition.doc)
    home_exports = getattr(reader.module(home), "__all__", None)
    if home != module and home_exports is not None and home_name not in home_exports:
        return entry, f"{module}: re-exports {name!r} from {home}, whose __all__ does not list {home_name!r}"
    return entry, None


def source_location(dotted: str) -> str | None:
    """``path:line`` of a module (its first line) or of a name bound at a module's top level; None if not found."""
    try:
        module = importlib.import_module(dotted)
        return f"{module.__file__}:1" if getattr(module, "__file__", None) else None
    except ImportError:
        pass
    module_name, _, name = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    definition = top_level(Path(path).read_text(encoding="utf-8"))[0].get(name)
    return f"{path}:{definition.line}" if definition else f"{path}:1"


_DOC_KIND = {"data": "doc comment (#: above or beside it, or a string below it)"}


def coverage_problems(api: Api, documented: Collection[str]) -> list[str]:
    """Everything the site fails to promise: ``api``'s own problems, then each public module without a page and each
    public name not documented at its home (in ``documented``, the dotted names the site describes) or without a
    docstring (for data, a doc comment)."""
    problems = list(api.problems)
    documented = set(documented)
    for module in api.modules:
        if module.name not in documented:
            problems.append(f"{module.name}: the module has no page on the site")
        for entry in module.defined:
            if entry.target not in documented:
                problems.append(f"{entry.target}: public (in {module.name}.__all__) but not documented on the site")
            if not entry.doc.strip():
                problems.append(f"{entry.target}: public but has no {_DOC_KIND.get(entry.kind, 'docstring')}")
    return problems
