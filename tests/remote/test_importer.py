"""The import hook and what a parent ships: records, scans of code and pickles,
the bundle's framing (no SSH server needed)."""

from __future__ import annotations

import importlib
import marshal
import pickle
import subprocess
import sys
import types

import pytest

from nursery_procs import _importer
from nursery_procs._importer import CODE, MISSING, SOURCE, Importer, ModuleRecord

from . import targets


def _source(name: str, text: str, *, package: bool = False) -> ModuleRecord:
    return ModuleRecord(name, SOURCE, package, f"/far/{name}.py", text.encode())


@pytest.fixture
def importer() -> types.SimpleNamespace:
    """An Importer installed for one test, and what it changed undone after."""
    before_path = list(sys.meta_path)
    before_modules = set(sys.modules)
    hook = Importer()
    hook.install()
    yield types.SimpleNamespace(hook=hook)
    sys.meta_path[:] = before_path
    _importer._installed = None
    for name in set(sys.modules) - before_modules:
        del sys.modules[name]


def test_a_shipped_package_and_module_import_and_show_their_source(
    importer: types.SimpleNamespace,
) -> None:
    importer.hook.add(
        [
            _source("shipped_pkg", "from . import inner\nNAME = 'pkg'\n", package=True),
            _source("shipped_pkg.inner", "def f():\n    return 41 + 1\n"),
        ]
    )
    module = importlib.import_module("shipped_pkg")
    assert module.NAME == "pkg" and module.inner.f() == 42
    assert module.__file__ == "/far/shipped_pkg.py"
    assert module.__path__ == []
    assert importer.hook.get_source("shipped_pkg.inner") == "def f():\n    return 41 + 1\n"


def test_shipped_code_objects_import(importer: types.SimpleNamespace) -> None:
    code = compile("VALUE = 'from code'\n", "/far/coded.py", "exec")
    importer.hook.add([ModuleRecord("coded", CODE, False, "/far/coded.py", marshal.dumps(code))])
    assert importlib.import_module("coded").VALUE == "from code"
    assert importer.hook.get_source("coded") is None


def test_a_module_that_cannot_be_shipped_fails_with_its_reason(
    importer: types.SimpleNamespace,
) -> None:
    importer.hook.add([_importer.missing("fastthing", "it is an extension module (x.so)")])
    with pytest.raises(ModuleNotFoundError, match=r"'fastthing'.*extension module") as caught:
        importlib.import_module("fastthing")
    assert caught.value.name == "fastthing"


def test_a_missing_module_is_fetched_off_the_loop_and_refused_on_it(
    importer: types.SimpleNamespace,
) -> None:
    asked: list[str] = []

    def fetch(name: str) -> list[ModuleRecord]:
        asked.append(name)
        return [_source(name, "VALUE = 7\n")]

    importer.hook.fetch = fetch
    importer.hook.loop_thread = -1  # this thread is not the event loop's
    assert importlib.import_module("fetched_mod").VALUE == 7
    assert asked == ["fetched_mod"]
    # The standard library is never asked for: the host has its own.
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("xml.nonexistent_stdlib_module")
    assert asked == ["fetched_mod"]
    import threading

    importer.hook.loop_thread = threading.get_ident()
    with pytest.raises(ModuleNotFoundError, match="preload"):
        importlib.import_module("other_fetched_mod")
    assert asked == ["fetched_mod"]


def test_malformed_records_are_refused() -> None:
    for bad in (
        ("name", SOURCE, False, "f"),
        ("bad name", SOURCE, False, "f", b""),
        ("name", 9, False, "f", b""),
        ("name", SOURCE, "yes", "f", b""),
        ("name", SOURCE, False, "f", "text"),
        "not a record",
    ):
        with pytest.raises(ValueError):
            ModuleRecord.from_data(bad)
    record = _source("fine", "")
    assert ModuleRecord.from_data(list(record)) == record


def test_records_of_the_parent_say_why_a_module_cannot_be_shipped() -> None:
    assert _importer.find_record("json", code=False).kind == SOURCE
    compiled = _importer.find_record("json", code=True)
    assert compiled.kind == CODE and isinstance(marshal.loads(compiled.payload), types.CodeType)
    extension = _importer.find_record("msgpack._cmsgpack", code=False)
    assert extension.kind == MISSING and "extension module" in extension.reason
    assert _importer.find_record("sys", code=False).kind == MISSING
    absent = _importer.find_record("no_such_module_anywhere", code=False)
    assert absent.kind == MISSING and "cannot import it" in absent.reason


def test_a_module_under_pytests_assertion_rewriter_still_ships() -> None:
    # pytest loads this test package with a loader that has no get_source.
    record = _importer.find_record(targets.__name__, code=True)
    assert record.kind == CODE
    assert _importer.find_record(targets.__name__, code=False).kind == SOURCE


def test_imports_are_found_in_functions_and_relative_ones_resolved() -> None:
    text = (
        "import os.path\n"
        "from . import sibling\n"
        "from ..up import thing\n"
        "def later():\n"
        "    import lazy_dep\n"
        "    from pkg_b.sub import name\n"
    )
    names = _importer.imported_names(_source("top.mid.mod", text))
    assert {
        "os",
        "os.path",
        "top.mid",
        "top.mid.sibling",
        "top.up",
        "top.up.thing",
        "lazy_dep",
        "pkg_b",
        "pkg_b.sub",
        "pkg_b.sub.name",
    } <= names


class Shipped:
    pass


def test_a_pickle_names_the_modules_of_its_classes_and_functions() -> None:
    data = pickle.dumps(
        [targets.where, Shipped(), Shipped(), {"x": importlib.import_module}],
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    assert _importer.pickle_modules(data) == {targets.__name__, __name__, "importlib"}
    assert _importer.pickle_modules(pickle.dumps((1, "two", b"3", [4.0]), protocol=5)) == set()
    assert _importer.pickle_modules(pickle.dumps(Shipped, protocol=2)) == {__name__}
    assert _importer.pickle_modules(b"not a pickle") == set()
    blob = pickle.dumps(("pkg.mod:fn", ()), protocol=5)
    assert _importer.string_target_module(blob) == "pkg.mod"
    assert _importer.string_target_module(pickle.dumps((targets.where, ()), protocol=5)) is None


def test_bundle_records_survive_their_framing() -> None:
    records = [_source("a", "x = 1\n"), _importer.missing("b", "why")]
    assert _importer.decode_records(_importer.encode_records(records)) == records
    assert _importer.frame(b"abc") == b"\0\0\0\0\0\0\0\x03abc"


def test_the_first_stage_refuses_an_old_python_in_its_own_words() -> None:
    # Python 3.11 pretending to be 3.9: the check runs before anything newer.
    fake = (
        "import sys; sys.version_info = (3, 9, 18, 'final', 0); sys.version = '3.9.18'; "
        f"sys.argv = ['-c', '-']; exec({_importer.STAGE1!r})"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", fake],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == _importer.EXIT_PYTHON_TOO_OLD
    assert b"this host runs Python 3.9.18; 3.11 or newer is needed" in result.stderr
    assert result.stdout == b""
