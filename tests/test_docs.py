"""The documentation site's API rules (docs/ext/public_api.py) on a toy package: which modules are public, where
each exported name is documented, and what the coverage check flags. Plain Python: no Sphinx, no site build."""

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "docs_toy_package"

_spec = importlib.util.spec_from_file_location("_docs_public_api", ROOT / "docs" / "ext" / "public_api.py")
public_api = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = public_api  # registered before it runs, as an import would (its dataclasses need it)
_spec.loader.exec_module(public_api)

FILES = {
    "__init__.py": '''
        """The face: re-exports, one of them lazily."""
        from docs_toy_package.core import CONST, documented, undocumented, unlisted

        def __getattr__(name):
            if name == "Thing":
                from docs_toy_package.core import Thing
                return Thing
            raise AttributeError(name)

        __all__ = ["CONST", "Thing", "documented", "undocumented", "unlisted"]
    ''',
    "core.py": '''
        """Where the names are defined."""

        #: A documented constant.
        CONST = 3
        BARE = 4  # a plain comment documents nothing

        def documented():
            """Documented."""

        def undocumented():
            pass

        def unlisted():
            """Exported by the face, but missing from this module's __all__."""

        class Thing:
            """A thing."""

        __all__ = ["BARE", "CONST", "Thing", "documented", "undocumented"]
    ''',
    "noall.py": '''
        def f():
            """No __all__ in this module."""
    ''',
    "_private.py": "def hidden():\n    pass\n",
    "old.py": "from docs_toy_package.core import *  # kept only for an old import path\n",
    "_moved.py": 'MODULES = {"docs_toy_package.old": "docs_toy_package.core"}\n',
    "sub/__init__.py": '''
        """A face over a private module."""
        from ._impl import helper

        __all__ = ["helper"]
    ''',
    "sub/_impl.py": '''
        def helper():
            """Help."""
    ''',
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    for name, text in FILES.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    sys.path.insert(0, str(root))
    yield public_api.read_api(PACKAGE)
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def _module(api, name):
    return next(m for m in api.modules if m.name == f"{PACKAGE}{name}")


def _entry(api, module, name):
    return next(e for e in _module(api, module).entries if e.name == name)


def test_public_modules_leave_out_private_ones_and_aliases(toy):
    assert [m.name for m in toy.modules] == [PACKAGE, *(f"{PACKAGE}.{m}" for m in ("core", "noall", "sub"))]


def test_each_name_is_documented_at_its_definition(toy):
    assert _entry(toy, "", "documented").target == f"{PACKAGE}.core.documented"
    assert _entry(toy, "", "Thing").target == f"{PACKAGE}.core.Thing"  # bound lazily, by __getattr__
    assert _entry(toy, "", "Thing").kind == "class"
    helper = _entry(toy, ".sub", "helper")  # defined in a private module: documented at the face
    assert (helper.target, helper.kind, helper.doc) == (f"{PACKAGE}.sub.helper", "function", "Help.")
    assert [e.name for e in _module(toy, "").defined] == []
    assert {e.name for e in _module(toy, ".core").defined} == {"BARE", "CONST", "Thing", "documented", "undocumented"}
    assert toy.aliases()[f"{PACKAGE}.documented"] == f"{PACKAGE}.core.documented"


def test_coverage_flags_every_gap(toy):
    documented = {m.name for m in toy.modules} | {e.target for m in toy.modules for e in m.defined}
    problems = public_api.coverage_problems(toy, documented - {f"{PACKAGE}.core.documented"})
    assert sorted(problems) == sorted(
        [
            f"{PACKAGE}.noall: the module has no __all__ (a public module lists its public names)",
            f"{PACKAGE}: re-exports 'unlisted' from {PACKAGE}.core, whose __all__ does not list 'unlisted'",
            f"{PACKAGE}.core.documented: public (in {PACKAGE}.core.__all__) but not documented on the site",
            f"{PACKAGE}.core.undocumented: public but has no docstring",
            f"{PACKAGE}.core.BARE: public but has no doc comment (#: above or beside it, or a string below it)",
        ]
    )


def test_a_module_without_a_page_is_flagged(toy):
    documented = {e.target for m in toy.modules for e in m.defined}
    assert f"{PACKAGE}.sub: the module has no page on the site" in public_api.coverage_problems(toy, documented)


SOURCE = '''
#: Above,
#: on two lines.
A = 1
B = 2  #: Beside.
C = 3
"""Below."""
D = 4  # a plain comment
#: Not this one: a line stands between.

E = 5
'''


def test_doc_comments_as_sphinx_reads_them():
    definitions, _ = public_api.top_level(SOURCE)
    docs = {name: d.doc for name, d in definitions.items()}
    assert docs == {"A": "Above,\non two lines.", "B": "Beside.", "C": "Below.", "D": "", "E": ""}
    analyzer = pytest.importorskip("sphinx.pycode").ModuleAnalyzer.for_string(SOURCE, "toy")
    sphinx_docs = {name: "\n".join(lines).strip() for (_, name), lines in analyzer.find_attr_docs().items()}
    assert {name: doc for name, doc in docs.items() if doc} == sphinx_docs


def test_problems_point_at_the_source(toy):
    assert public_api.source_location(f"{PACKAGE}.core.documented").endswith(f"{PACKAGE}/core.py:7")
    assert public_api.source_location(f"{PACKAGE}.noall").endswith(f"{PACKAGE}/noall.py:1")
